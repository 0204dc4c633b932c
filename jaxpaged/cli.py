"""`jaxpaged` command line: `generate` (one-shot) and `serve` (OpenAI-compatible server)."""

import argparse
import logging
import os
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir, .gguf file, orbax dir or dummy config "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--seed", type=int, default=0)


def _generate(args) -> int:
    from jaxpaged import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, load_format=args.load_format, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    messages = [[{"role": "user", "content": p}] for p in args.prompts]
    run = llm.generate if args.raw else llm.chat
    outputs = run(args.prompts if args.raw else messages, params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text.strip())
    return 0


def main(argv: list[str] | None = None) -> int:
    # Before JAX starts: let it take most of an accelerator, as vLLM does (gpu_memory_utilization plans within it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    parser = argparse.ArgumentParser(prog="jaxpaged", description="PagedAttention LLM engine on JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer prompts (chat template unless --raw) and print the replies")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--raw", action="store_true", help="complete the prompt text instead of chatting")
    _add_engine_args(gen)
    from jaxpaged.server.cli import add_serve_args, run_server

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
