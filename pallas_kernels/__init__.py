"""Ragged paged attention: pure-JAX reference and Pallas kernels for GPU and TPU."""

from jaxpaged.kernels.ops import IMPLS, ragged_paged_attention, resolve_impl
from jaxpaged.kernels.reference import PAD_SLOT, ragged_paged_attention_reference, write_kv_pages

__all__ = [
    "IMPLS",
    "PAD_SLOT",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "resolve_impl",
    "write_kv_pages",
]
