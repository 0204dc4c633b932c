"""`jaxpaged` command line: `generate` (one-shot), `chat` (interactive) and `serve` (OpenAI-compatible server)."""

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
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="devices to shard the model over")
    p.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0: every process of a multi-host run runs the same command")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="log jaxpaged's INFO messages (loading, KV cache)")


def _make_llm(args):
    from jaxpaged import LLM

    return LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               gpu_memory_utilization=args.gpu_memory_utilization, load_format=args.load_format, seed=args.seed,
               tensor_parallel_size=args.tensor_parallel_size, coordinator_address=args.coordinator_address,
               num_processes=args.num_processes, process_id=args.process_id)


def _generate(args) -> int:
    from jaxpaged import SamplingParams

    llm = _make_llm(args)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.stream:
        return _generate_streamed(llm, args, params)
    messages = [[{"role": "user", "content": p}] for p in args.prompts]
    run = llm.generate if args.raw else llm.chat
    outputs = run(args.prompts if args.raw else messages, params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text.strip())
    return 0


def _generate_streamed(llm, args, params) -> int:
    """Answers the prompts one at a time, printing each answer's text as it is generated; 130 on Ctrl-C."""
    from jaxpaged.chat import chat_prompt, stream_reply

    for i, text in enumerate(args.prompts):
        prompt = text if args.raw else chat_prompt(llm.get_tokenizer(), [{"role": "user", "content": text}])
        _, stopped = stream_reply(llm.llm_engine, f"generate-{i}", prompt, params)
        print()
        if stopped:
            return 130
    return 0


def _chat(args) -> int:
    from jaxpaged import SamplingParams
    from jaxpaged.chat import ChatSession, run_chat

    llm = _make_llm(args)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    return run_chat(ChatSession(llm.llm_engine, params, args.system))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpaged", description="PagedAttention LLM engine on JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer prompts (chat template unless --raw) and print the replies")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--raw", action="store_true", help="complete the prompt text instead of chatting")
    gen.add_argument("--stream", action="store_true", help="print each answer's text as it is generated")
    _add_engine_args(gen)
    chat = sub.add_parser("chat", help="chat with the model in the terminal, replies streamed")
    chat.add_argument("--max-tokens", type=int, default=256, help="the longest reply, in tokens (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    chat.add_argument("--system", default=None, help="a system prompt that starts the conversation")
    _add_engine_args(chat)
    from jaxpaged.server.cli import add_serve_args

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server"))
    return parser


def _configure_logging(args) -> None:
    """WARNING and up for everyone; jaxpaged's INFO too with -v, and always for `serve` (it logs its URL)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    verbose = args.command == "serve" or args.verbose
    logging.getLogger("jaxpaged").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    # Before JAX starts: let it take most of an accelerator, as vLLM does (gpu_memory_utilization plans within it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    # Before transformers is imported: no "PyTorch was not found" advisory (jaxpaged never needs torch).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = _build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        from jaxpaged.server.cli import run_server

        return run_server(args)
    except KeyboardInterrupt:  # while loading or compiling: leave without a traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
