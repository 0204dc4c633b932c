"""Device memory for compiling: XLA's GPU autotuner times each GEMM it tunes on fresh buffers of the GEMM's operands
and output, each with 8 MiB red zones on both sides, allocated beside the weights and the KV pool.

Eight threads compiling the samplers of Llama-3.1-8B (a 1 GiB LM head, 1,018 MiB per autotuning buffer) need about
10 GiB at once, more than the pool leaves free on an 80 GB card at `gpu_memory_utilization=0.9`: XLA then fails the
compile (RESOURCE_EXHAUSTED) or keeps an untuned kernel. `CompileMemory` lets compiles start only while their
estimated autotuning buffers (`autotune_bytes`) fit what the pool and the activations leave free, and compiles
one that still runs out of memory again, alone: the estimate counts the buffers above and no more, and one H100
start ran out with the estimates within bounds (benchmarks/RESULTS.md, 2026-12-06).
"""

import contextlib
import logging
import threading
from collections.abc import Callable

import jax

from jaxpaged.models import ModelConfig

logger = logging.getLogger(__name__)

REDZONE = 8 << 20  # XLA's --xla_gpu_redzone_padding_bytes default, on each side of each autotuning buffer


def gemm_bytes(rows: int, k: int, n: int, in_bytes: int, out_bytes: int) -> int:
    """Bytes the autotuner allocates to time one [rows, k] x [k, n] GEMM: both operands and the output twice (the
    candidate's and the reference it is checked against), each between red zones."""
    return (rows * k + k * n) * in_bytes + 2 * rows * n * out_bytes + 4 * 2 * REDZONE


def layer_gemm_bytes(cfg: ModelConfig, rows: int, in_bytes: int) -> int:
    """The largest autotuning allocation of one decoder layer at `rows` tokens (projections fused: the larger)."""
    shapes = ((cfg.hidden_size, cfg.qkv_width), (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
              (cfg.hidden_size, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size))
    return max(gemm_bytes(rows, k, n, in_bytes, in_bytes) for k, n in shapes)


def autotune_bytes(cfg: ModelConfig, key: tuple, in_bytes: int, prompt_chunk: int) -> int:
    """Estimated peak autotuning bytes of compiling the step program `key` (the runner's program keys): the
    layers' GEMMs at the program's rows, the LM head at the sampled rows. Without tensor parallelism's split of the
    weights, so an over-estimate on a mesh."""
    kind, *shape = key
    lm_head = lambda rows: gemm_bytes(rows, cfg.hidden_size, cfg.vocab_size, in_bytes, 4)  # noqa: E731  float32 out
    if kind == "forward":
        return layer_gemm_bytes(cfg, shape[0], in_bytes)
    if kind == "sample":
        return lm_head(shape[0])
    if kind == "decode":
        return max(layer_gemm_bytes(cfg, shape[0], in_bytes), lm_head(shape[0]))
    if kind == "prompt":
        return lm_head(min(shape[0], prompt_chunk))
    return 0


class CompileMemory:
    """A weighted semaphore over device bytes: a compile holds its estimate while XLA compiles it and waits while
    the estimates held would exceed the capacity; one larger than the whole capacity runs alone. Unbounded until
    `limit` sets a capacity (the runner sets one on GPUs only)."""

    def __init__(self):
        self._capacity: int | None = None
        self._held = 0
        self.waiting = 0  # compiles waiting for memory
        self._cond = threading.Condition()

    def limit(self, capacity: int | None) -> None:
        with self._cond:
            self._capacity = capacity
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        """Waits until `nbytes` (at most the capacity) fit beside what other compiles hold; holds them meanwhile."""
        with self._cond:
            need = 0 if self._capacity is None else min(nbytes, self._capacity)
            self.waiting += 1
            self._cond.wait_for(lambda: self._capacity is None or self._held + need <= self._capacity)
            self.waiting -= 1
            self._held += need
        try:
            yield
        finally:
            with self._cond:
                self._held -= need
                self._cond.notify_all()

    def compile(self, fn: Callable, nbytes: int, what: str):
        """fn() (an XLA compile) holding `nbytes`; when XLA runs out of device memory beside other compiles, fn()
        again once no other compile holds memory. Out of memory alone: an error that says what to lower."""
        try:
            with self.hold(nbytes):
                return fn()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or self._capacity is None:
                raise
        logger.warning("Out of device memory compiling %s beside other compiles; compiling it alone.", what)
        try:
            with self.hold(self._capacity):
                return fn()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise RuntimeError(
                f"Out of device memory compiling {what} alone, with {self._capacity / 2**30:.2f} GiB left beside "
                "the weights, the KV pool and the activations: lower gpu_memory_utilization (or "
                "max_num_batched_tokens / max_num_seqs).") from e
