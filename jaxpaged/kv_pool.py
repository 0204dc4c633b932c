"""How many KV pages fit: from an override, a byte budget, or free device memory (vLLM's profiling)."""

import logging

import jax
import numpy as np

logger = logging.getLogger(__name__)

_CPU_DEFAULT_CAP = 1 << 30  # bytes; CPU hosts share memory with everything else


def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize


def device_free_bytes(gpu_memory_utilization: float) -> int:
    """Bytes for the pool and the activations on an accelerator: utilization x JAX's memory limit - what is in
    use (the weights).

    JAX may use XLA_PYTHON_CLIENT_MEM_FRACTION of the device (default 0.75; the `jaxpaged` CLI sets 0.95 when
    unset); `gpu_memory_utilization` is the share of that the engine plans for, the rest stays free for XLA's
    autotuning and workspace.
    """
    limit, in_use = _memory_limit_and_use()
    if not limit:
        raise RuntimeError("cannot read device memory; set num_gpu_blocks_override or kv_cache_memory_bytes")
    logger.info("Device memory for JAX: %.2f GiB; weights %.2f GiB.", limit / 2**30, in_use / 2**30)
    return int(limit * gpu_memory_utilization - in_use)


def device_unused_bytes() -> int | None:
    """JAX's memory limit on the first local device minus what is in use now; None when the device does not say."""
    limit, in_use = _memory_limit_and_use()
    return limit - in_use if limit else None


def _memory_limit_and_use() -> tuple[int, int]:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0), stats.get("bytes_in_use", 0)


def num_pages_for(*, override: int | None, kv_bytes: int | None, per_page: int, backend: str, max_num_seqs: int,
                  max_model_len: int, page_size: int, device_budget=None) -> int:
    """Pages in the pool (page 0, the null page, included)."""
    if override is not None:
        return override
    if kv_bytes is None:
        if backend == "cpu":
            want = (max_num_seqs * -(-max_model_len // page_size) + 1) * per_page  # + the null page
            kv_bytes = min(want, _CPU_DEFAULT_CAP)
        else:
            kv_bytes = device_budget()
    if kv_bytes < 2 * per_page:
        raise ValueError(
            f"Not enough memory for the KV cache: {kv_bytes / 2**20:.1f} MiB available, one page needs "
            f"{per_page / 2**20:.2f} MiB. Raise gpu_memory_utilization or kv_cache_memory_bytes, or use a smaller "
            "dtype or model.")
    return kv_bytes // per_page
