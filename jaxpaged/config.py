"""Engine configuration: the `LLM(...)` / `jaxpaged serve` arguments, validated in one place."""

import dataclasses

ATTENTION_IMPLS = ("auto", "reference", "xla", "gpu", "tpu")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "orbax")
DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")


@dataclasses.dataclass
class EngineArgs:
    """Everything the engine needs, with vLLM's names and defaults where vLLM has them.

    `max_num_seqs` and `max_num_batched_tokens` default per backend (None): 256 / 8192 on GPU and TPU as in vLLM,
    16 / 256 on CPU, where every compiled bucket costs seconds. `kv_cache_memory_bytes` sizes the page pool
    directly; on CPU without it the pool holds `max_num_seqs` full-length sequences (capped at 1 GiB).
    `attention_impl` picks the ragged paged attention kernel ("auto" follows the backend; "xla" is the blocked
    pure-JAX one that CPU uses).
    `compilation_cache_dir` (None: ~/.cache/jaxpaged/xla) holds the compiled step programs (`executables/`, loaded
    without tracing on a later start: see `jaxpaged.executable_cache`) and JAX's persistent compilation cache.
    `async_scheduling` keeps one step in flight: the host schedules step N+1 and processes step N's outputs while
    the device runs (vLLM's name; here on by default, since outputs are the same and the host loop is hidden).
    `num_scheduler_steps` (vLLM v0's multi-step scheduling): when every running request decodes and no waiting
    request could be admitted, one step runs up to this many decode steps in one device program, each step's
    sampled ids fed to the next on the device; the host schedules, sends inputs and processes outputs once per
    step instead of once per token. A request that stops early has its extra tokens dropped; a request that
    arrives meanwhile waits for the step to end (time to first token is the cost of larger values).
    `multi_step_with_prefill` makes a step with prefills a multi-step one too: the prefill chunks and every
    decode's next token share one forward pass, then the decodes run up to `num_scheduler_steps` more tokens in
    the multi-step program (vLLM v0's multi-step with chunked prefill), so an arriving request no longer cuts the
    running ones to one token per step; its first token waits for those. It helps requests that arrive over time
    and, unchecked, costs a burst queued at once: on one H100 (benchmarks/RESULTS.md, 2026-12-07) the server's
    TPOT at 80 % load fell from 2.94 to 2.20 ms and its maximum throughput rose 1.22x, while offline `generate`
    over 256 prompts queued together took 1.18x as long (the requests prefilled first finish first, leaving a long
    tail of small decode batches). So steps stay single while a burst's prefills exceed one step's token budget
    (`Scheduler`): offline runs then ran at 0.993x (256 x 512 / 128) and 1.003x (ragged) the speed without the
    flag: neither cost nor gain. It is off here, as before, and on by default in `jaxpaged serve`
    (`--no-multi-step-with-prefill`).
    `coordinator_address` / `num_processes` / `process_id` join a `jax.distributed` group of several processes
    (hosts), whose devices the model then spans (`jaxpaged.distributed`); None reads JAX's environment variables.
    """

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    attention_impl: str = "auto"
    compilation_cache_dir: str | None = None
    served_model_name: str | None = None
    disable_log_stats: bool = True
    async_scheduling: bool = True
    num_scheduler_steps: int = 1
    multi_step_with_prefill: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0 < self.gpu_memory_utilization <= 1.0,
                     "(0, 1]")
        _check_range("block_size", self.block_size, self.block_size in (8, 16, 32, 64, 128), "8, 16, 32, 64 or 128")
        _check_range("num_scheduler_steps", self.num_scheduler_steps,
                     isinstance(self.num_scheduler_steps, int) and 1 <= self.num_scheduler_steps <= 64, "1..64")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks_override",
                     "kv_cache_memory_bytes"):
            value = getattr(self, name)
            _check_range(name, value, value is None or (isinstance(value, int) and value >= 1), "None or >= 1")
        if self.num_gpu_blocks_override is not None:
            _check_range("num_gpu_blocks_override", self.num_gpu_blocks_override, self.num_gpu_blocks_override >= 2,
                         ">= 2 (page 0 is the reserved null page)")
        _check_range("tensor_parallel_size", self.tensor_parallel_size,
                     isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, "an integer >= 1")
        for name in ("num_processes", "process_id"):
            value = getattr(self, name)
            _check_range(name, value, value is None or (isinstance(value, int) and value >= (name == "num_processes")),
                         "None or an integer >= " + ("1" if name == "num_processes" else "0"))


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}.")


def _check_range(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def default_batch_limits(backend: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) defaults for a JAX backend."""
    return (16, 256) if backend == "cpu" else (256, 8192)
