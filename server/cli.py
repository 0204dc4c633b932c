"""`jaxpaged serve` / `python -m jaxpaged.server`: vLLM's flag spelling, the engine thread, uvicorn."""

import argparse
import dataclasses
import logging
import os
import sys
import threading

from jaxpaged.config import ATTENTION_IMPLS, DTYPES, LOAD_FORMATS, EngineArgs

logger = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the server's and the engine's flags (vLLM's names) to `p`; returns it."""
    p.add_argument("model_tag", nargs="?", default=None, help="the model, as in `vllm serve MODEL` (or --model)")
    p.add_argument("--model", default=None,
                   help="HF model dir, .gguf file, orbax dir or dummy config (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $JAXPAGED_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send and /v1/models lists")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode sub-steps per scheduling pass when every request decodes (vLLM v0's multi-step)")
    p.add_argument("--multi-step-with-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="with --num-scheduler-steps > 1, steps with prefills are multi-step too: decodes go on "
                        "after the shared forward pass (default on for the server: arrivals no longer cut running "
                        "requests to one token per step; EngineArgs' default, for offline runs, is off)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host, jax.distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-all-before-ready", action="store_true",
                   help="/health turns 200 only once every step program is compiled (default: once every step can "
                        "run; the programs that make some steps faster compile in the background after that)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags: every EngineArgs field that has a flag of the same name."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(args, f.name)}
    values["model"] = args.model or getattr(args, "model_tag", None)
    return EngineArgs(**values)


def run_server(args: argparse.Namespace) -> int:
    """Serves until interrupted; /health turns 200 after warm-up. Returns 1 if the engine fails to start. In a
    multi-host group, processes other than 0 follow process 0 (`server/follower.py`) instead of serving."""
    from jaxpaged import distributed

    engine_args = engine_args_from(args)
    group = distributed.group_from(engine_args.coordinator_address, engine_args.num_processes,
                                   engine_args.process_id)
    if group is not None and group[2] > 0:
        from jaxpaged.server.follower import run_follower

        return run_follower(engine_args)
    import uvicorn

    from jaxpaged.server.app import build_app
    from jaxpaged.server.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(engine_args, background_compile=not args.compile_all_before_ready)
    app = build_app(engine, api_key=args.api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level))
    url = f"http://{args.host}:{args.port}"

    def announce() -> None:
        engine.ready.wait()
        if engine.start_error is not None:
            server.should_exit = True
            return
        logger.info("Serving %s at %s/v1 (OpenAI-compatible; /health, /metrics)%s", engine.model_name, url,
                    " with an API key" if args.api_key else "")

    logger.info("Starting the engine (loading and compiling); %s/health is 503 until it is ready", url)
    threading.Thread(target=announce, name="jaxpaged-announce", daemon=True).start()
    server.run()
    if engine.start_error is not None:
        logger.error("The engine failed to start: %s", engine.start_error)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxpaged.server [flags]`."""
    # Before JAX starts: let it take most of an accelerator, as vLLM does (gpu_memory_utilization plans within it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found": torch is unused
    parser = add_serve_args(argparse.ArgumentParser(prog="python -m jaxpaged.server",
                                                    description="jaxpaged OpenAI-compatible server"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
