"""How many KV pages fit: from an override, a byte budget, or free device memory (vLLM's profiling)."""

import logging
import os

import jax
import numpy as np

logger = logging.getLogger(__name__)

_CPU_DEFAULT_CAP = 1 << 30  # bytes; CPU hosts share memory with everything else


def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize


def device_kv_budget(gpu_memory_utilization: float, activation_bytes: int) -> int:
    """Bytes left for the pool on an accelerator: utilization x device memory - what is in use - activations.

    JAX's allocator limit is XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the device; the total is derived
    from it so that `gpu_memory_utilization` means a fraction of the whole device as in vLLM.
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    if not limit:
        raise RuntimeError("cannot read device memory; set num_gpu_blocks_override or kv_cache_memory_bytes")
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))
    total = limit / fraction
    in_use = stats.get("bytes_in_use", 0)
    budget = min(total * gpu_memory_utilization, limit) - in_use - activation_bytes
    logger.info("Device memory: %.2f GiB total, %.2f GiB in use (weights), %.2f GiB activation peak.",
                total / 2**30, in_use / 2**30, activation_bytes / 2**30)
    return int(budget)


def num_pages_for(*, override: int | None, kv_bytes: int | None, per_page: int, backend: str, max_num_seqs: int,
                  max_model_len: int, page_size: int, device_budget=None) -> int:
    """Pages in the pool (page 0, the null page, included)."""
    if override is not None:
        return override
    if kv_bytes is None:
        if backend == "cpu":
            want = max_num_seqs * -(-max_model_len // page_size) * per_page
            kv_bytes = min(want, _CPU_DEFAULT_CAP)
        else:
            kv_bytes = device_budget()
    if kv_bytes < 2 * per_page:
        raise ValueError(
            f"Not enough memory for the KV cache: {kv_bytes / 2**20:.1f} MiB available, one page needs "
            f"{per_page / 2**20:.2f} MiB. Raise gpu_memory_utilization or kv_cache_memory_bytes, or use a smaller "
            "dtype or model.")
    return kv_bytes // per_page
