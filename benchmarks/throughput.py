"""Offline throughput as vLLM's `vllm bench throughput`: jaxpaged, or HF transformers on the same requests.

    python benchmarks/throughput.py --model llama-3.2-1b --load-format dummy --num-prompts 256 \
        --input-len 256 --output-len 128 [--random-range-ratio 0.5] [--engine hf|hf-compiled]
    python benchmarks/throughput.py --dataset nano-vllm --max-num-seqs 256      # 512 requests, lengths 100..1024

--dataset random (default): input/output lengths uniform in [len * (1 - r), len * (1 + r)] (vLLM's
--random-range-ratio r; 0: fixed lengths). --dataset nano-vllm: nano-vllm's bench.py workload (random token ids,
input and output lengths each uniform in 100..1024, seed 0) with --num-prompts 512 by default. Every request
generates exactly its output length (ignore_eos, greedy).

--engine hf / hf-compiled: HF transformers `generate`, eager or static cache + torch.compile, in static batches of
--hf-batch-size (hf_baseline.py says how ragged lengths are counted); --hf-max-requests N runs only the first N
requests (reported as a subset). Run each engine in its own device command: JAX and torch fight over device memory.

--roofline (default on a GPU): before the engine starts, a subprocess measures the bf16 matmul peak and the copy
bandwidth; the run then reports `roofline_output_tokens_per_s` (roofline.py states the model) and
`pct_of_roofline`. Prints vLLM's "Throughput: ..." line and one JSON line per measurement (also appended to
$OUT/throughput.jsonl when $OUT is set).
"""

import argparse
import array
import dataclasses
import logging
import os
import sys
import time
import zlib

from results import emit
from roofline import ModelCounts, measure_in_subprocess, workload_roofline
from workloads import BenchRequest, nano_vllm_requests, random_requests, workload_summary

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ENGINES = ("jaxpaged", "hf", "hf-compiled")


def model_config(model: str):
    """The `ModelConfig` of a shipped config name, a HF directory / config.json or a .gguf file, without loading
    weights."""
    from jaxpaged.models import ModelConfig
    from jaxpaged.models.loader import SHIPPED_CONFIGS, shipped_config
    from jaxpaged.models.safetensors_loader import read_json

    if model in SHIPPED_CONFIGS:
        return ModelConfig.from_hf(shipped_config(model))
    if model.endswith(".gguf"):
        from jaxpaged.models.gguf_loader import gguf_config, open_gguf

        return gguf_config(open_gguf(model), model, None)[0]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    return ModelConfig.from_hf(read_json(path, "a HF config.json"))


def build_requests(args, vocab_size: int) -> list[BenchRequest]:
    """The workload of --dataset."""
    if args.dataset == "nano-vllm":
        return nano_vllm_requests(args.num_prompts, vocab_size, args.seed)
    return random_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio, vocab_size,
                           args.seed)


def engine_kwargs(args, requests: list[BenchRequest]) -> dict:
    """`LLM(...)` keyword arguments from the flags; --max-model-len defaults to the workload's longest request.
    async_scheduling, num_scheduler_steps and multi_step_with_prefill are passed only when given and this
    jaxpaged's EngineArgs has them (so the script also measures older commits)."""
    from jaxpaged.config import EngineArgs

    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    kwargs = dict(load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len or longest,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  attention_impl=args.attention_impl)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in ("async_scheduling", "num_scheduler_steps", "multi_step_with_prefill"):
        value = getattr(args, name)
        if value is not None and name in fields:
            kwargs[name] = value
        elif value is not None:
            print(f"note: this jaxpaged has no EngineArgs.{name}; --{name.replace('_', '-')} ignored",
                  file=sys.stderr)
    return kwargs


def sampling_params(requests: list[BenchRequest]) -> list:
    """One greedy SamplingParams per request: exactly its output length."""
    from jaxpaged import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]


def run_jaxpaged(args, requests: list[BenchRequest]) -> dict:
    """Times one `LLM.generate` of all requests, after an untimed one of the first 8 (which warms the host path
    and leaves those 8 prompts in the prefix cache, as this script always has). `startup_seconds`: `LLM(...)`,
    model init and step compilation, printed as soon as it is done."""
    from jaxpaged import LLM

    kwargs = engine_kwargs(args, requests)
    start = time.perf_counter()
    llm = LLM(args.model, **kwargs)
    llm.llm_engine.warm_up()  # every bucket compiled before the timed run, as the server starts
    startup = time.perf_counter() - start
    emit({"part": "engine_ready", "engine": "jaxpaged", "startup_seconds": startup}, "throughput")
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = sampling_params(requests)
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm the host path
    before = padding_counts(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    padding = padding_shares({k: v - before[k] for k, v in padding_counts(llm).items()})
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    return {"engine": "jaxpaged", "seconds": elapsed, "requests_per_s": len(outs) / elapsed,
            "output_tokens_per_s": generated / elapsed, "total_tokens_per_s": (generated + prompt) / elapsed,
            "output_tokens": generated, "startup_seconds": startup, "llm_kwargs": kwargs,
            "output_digests": output_digests([o.outputs[0].token_ids for o in outs]), "padding": padding}


def padding_counts(llm) -> dict:
    """The engine's step token / row counters and their bucket padding (empty for a jaxpaged without them)."""
    return {m.name.removeprefix("jaxpaged:step_"): m.value for m in llm.get_metrics()
            if m.name.startswith("jaxpaged:step_")}


def padding_shares(counts: dict) -> dict:
    """`counts` plus the padding's share of the tokens and rows the steps ran, in percent."""
    if not counts:
        return counts
    tokens, rows = counts["tokens"] + counts["padding_tokens"], counts["rows"] + counts["padding_rows"]
    return {**counts, "padding_tokens_pct": 100 * counts["padding_tokens"] / tokens,
            "padding_rows_pct": 100 * counts["padding_rows"] / rows}


def output_digests(token_lists: list[list[int]]) -> str:
    """One hex crc32 per request's output ids (8 characters each): runs that should give the same greedy tokens
    (async on and off, multi-step decode) are compared request by request."""
    return "".join(f"{zlib.crc32(array.array('i', ids).tobytes()):08x}" for ids in token_lists)


def add_roofline(result: dict, peaks: dict, cfg, args, requests: list[BenchRequest]) -> dict:
    """`result` plus the roofline of the requests it ran (its first `requests_run`), when `peaks` has numbers."""
    if "peak_flops" not in peaks:
        return result
    dtype = args.dtype if args.dtype != "auto" else str(cfg.torch_dtype or "bfloat16").replace("torch.", "")
    counts = ModelCounts.from_config(cfg, 4 if dtype in ("float32", "float") else 2)
    ran = requests[: result.get("requests_run", len(requests))]
    roof = workload_roofline(counts, ran, args.max_num_seqs, peaks["peak_flops"], peaks["copy_bytes_per_s"])
    return {**result, "roofline_output_tokens_per_s": roof.output_tokens_per_s,
            "pct_of_roofline": 100 * result["output_tokens_per_s"] / roof.output_tokens_per_s,
            "roofline": {**dataclasses.asdict(roof), "max_num_seqs": args.max_num_seqs, "dtype_bytes":
                         counts.dtype_bytes, "peak_flops": peaks["peak_flops"],
                         "copy_bytes_per_s": peaks["copy_bytes_per_s"]}}


def add_workload_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The workload flags (--dataset, lengths, --num-prompts, --seed); see finish_args."""
    p.add_argument("--dataset", choices=("random", "nano-vllm"), default="random")
    p.add_argument("--num-prompts", type=int, default=None, help="default 256 (random), 512 (nano-vllm)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def add_engine_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model and jaxpaged engine flags (see engine_kwargs)."""
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest request")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="passed to the engine if it has the option (default: the engine's default)")
    p.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="decode sub-steps per scheduling pass, passed as --async-scheduling is")
    p.add_argument("--multi-step-with-prefill", action="store_true", default=None,
                   help="steps with prefills are multi-step too, passed as --async-scheduling is")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on other flags (--num-prompts by --dataset)."""
    if args.num_prompts is None:
        args.num_prompts = 512 if args.dataset == "nano-vllm" else 256
    return args


def _engine_list(text: str) -> list[str]:
    engines = text.split(",")
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise argparse.ArgumentTypeError(f"unknown engine {bad[0]!r}: choose from {', '.join(ENGINES)}")
    return engines


def parse_args(argv=None) -> argparse.Namespace:
    p = add_workload_args(add_engine_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    p.add_argument("--engine", type=_engine_list, default=["jaxpaged"],
                   help="jaxpaged, hf or hf-compiled, or several comma-separated to run in this one process "
                        "(CPU: same-process ratios; on a GPU run each in its own command)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--hf-max-requests", type=int, default=None, help="HF runs only the first N requests")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the device and report the roofline (default: on a GPU only)")
    return finish_args(p.parse_args(argv))


def log_engine_info() -> None:
    """jaxpaged's INFO lines (KV pool size, step programs compiled / loaded from the executable cache, seconds) to
    stderr, or its DEBUG lines (each program's trace and compile seconds) with JAXPAGED_LOG_LEVEL=DEBUG; other
    libraries stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxpaged").setLevel(os.environ.get("JAXPAGED_LOG_LEVEL", "INFO"))


def main() -> None:
    args = parse_args()
    log_engine_info()
    cfg = model_config(args.model)
    requests = build_requests(args, cfg.vocab_size)
    peaks = {} if args.roofline is False else measure_in_subprocess(only_if_gpu=args.roofline is None)
    if peaks and not peaks.get("skipped"):
        emit({"part": "device_peaks", **peaks}, "throughput")
    first = None
    for engine in args.engine:
        result = run_engine(engine, args, requests, peaks, cfg)
        first = first or result
        if result is not first:
            ratio = first["output_tokens_per_s"] / result["output_tokens_per_s"]
            print(f"{first['engine']} / {result['engine']}: {ratio:.2f}x output tokens/s", flush=True)
            emit({"part": "ratio", "engines": [first["engine"], result["engine"]], "output_tokens_ratio": ratio},
                 "throughput")


def run_engine(engine: str, args, requests: list[BenchRequest], peaks: dict, cfg) -> dict:
    """Runs and reports one engine on `requests`; returns its result."""
    if engine == "jaxpaged":
        result = run_jaxpaged(args, requests)
    else:
        from hf_baseline import run_hf

        result = run_hf(args, requests, compiled=engine == "hf-compiled")
    result = add_roofline(result, peaks, cfg, args, requests)
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s", flush=True)
    if "pct_of_roofline" in result:
        print(f"Roofline: {result['roofline_output_tokens_per_s']:.2f} output tokens/s "
              f"({result['pct_of_roofline']:.1f}% reached)", flush=True)
    emit({**result, "workload": workload_summary(requests), "args": vars(args)}, "throughput")
    return result


if __name__ == "__main__":
    main()
