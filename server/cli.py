"""`jaxpaged serve` / `python -m jaxpaged.server`: flags with vLLM's spelling, uvicorn start-up."""

import argparse
import logging

from jaxpaged.config import EngineArgs

logger = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--log-level", default="info")
    return p


def engine_args(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, num_gpu_blocks_override=args.num_gpu_blocks_override,
        seed=args.seed, load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size,
        attention_impl=args.attention_impl, served_model_name=args.served_model_name)


def run_server(args: argparse.Namespace) -> int:
    """Starts the engine thread, then serves; /health turns 200 once warm-up compilation is done."""
    import uvicorn

    from jaxpaged.models.loader import EMBEDDED_MODEL
    from jaxpaged.server.app import build_app
    from jaxpaged.server.async_engine import AsyncLLMEngine

    eargs = engine_args(args)
    name = args.served_model_name or (args.model or EMBEDDED_MODEL)
    engine = AsyncLLMEngine(eargs)
    engine.start()
    app = build_app(engine, name, args.api_key)
    logger.info("Serving %s on http://%s:%d/v1 (ready on /health after warm-up)", name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
