"""The attention entry point the model calls, dispatching to a pure-JAX implementation or a Pallas kernel."""

import jax
import jax.numpy as jnp

from jaxpaged.kernels.reference import PAD_SLOT, ragged_paged_attention_reference, token_layout, write_kv_pages
from jaxpaged.kernels.xla_blocked import ragged_paged_attention_xla

IMPLS = ("auto", "reference", "xla", "gpu", "tpu")


def resolve_impl(impl: str, head_dim: int | None = None) -> str:
    """Maps "auto" to the implementation for `jax.default_backend()`; validates explicit names.

    "auto" is "xla" (blocked pure JAX) on CPU, and keeps the reference for shapes the GPU kernel does not take (a
    head_dim that is not a power of two; "xla" is unmeasured on GPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    impl = {"cpu": "xla", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "reference")
    if impl == "gpu" and head_dim is not None and head_dim & (head_dim - 1):
        return "reference"
    return impl


def ragged_paged_attention(
    q: jax.Array,             # [T, num_q_heads, head_dim]  new tokens of all sequences, concatenated
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # same shape as k_pages
    kv_lens: jax.Array,       # [S] int32  tokens of sequence s in the pages, its new tokens included
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32  page table
    cu_q_lens: jax.Array,     # [S + 1] int32  new tokens of sequence s are q[cu_q_lens[s]:cu_q_lens[s + 1]]
    num_seqs: jax.Array,      # [1] int32  sequences at index >= num_seqs are padding
    *,
    sm_scale: float,
    impl: str = "auto",
    interpret: bool = False,
    decode_only: bool = False,
) -> jax.Array:               # [T, num_q_heads, head_dim]; rows past cu_q_lens[num_seqs] are unspecified
    """Ragged paged attention over a batch mixing prefill chunks and decode tokens.

    Query i of sequence s sits at position `kv_lens[s] - q_len_s + i` and attends causally to positions
    0..itself. The new tokens' K/V must already be in the pages (`write_kv_pages`). Page 0 is the null page.
    `impl="auto"` picks the kernel for `jax.default_backend()`; `interpret=True` runs Pallas kernels in
    interpret mode (CPU tests). `decode_only` promises that every sequence has exactly one new token (a
    multi-step decode): the GPU kernel then skips its prefill launch; the other implementations ignore it.
    """
    impl = resolve_impl(impl, q.shape[-1])
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    if impl == "xla":
        return ragged_paged_attention_xla(*args, sm_scale=sm_scale)
    if impl == "gpu":
        from jaxpaged.kernels.gpu_split import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(*args, sm_scale=sm_scale, interpret=interpret, decode_only=decode_only)
    from jaxpaged.kernels.tpu import ragged_paged_attention_tpu

    return ragged_paged_attention_tpu(*args, sm_scale=sm_scale, interpret=interpret)


def ragged_paged_attention_fused(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    k_new: jax.Array,         # [T, num_kv_heads, head_dim]  the step's new keys, token-aligned with q
    v_new: jax.Array,         # [T, num_kv_heads, head_dim]
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # same shape as k_pages
    kv_lens: jax.Array,       # [S] int32, new tokens included
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [T, H, D], k_pages, v_pages
    """`write_kv_pages` of the new tokens (slots from the page table) followed by `ragged_paged_attention`.

    On "gpu" both happen in the attention launches (the pages are aliased, so a donated pool is updated in
    place); elsewhere it is the scatter then the attention. Padding tokens write nothing into real pages.
    """
    impl = resolve_impl(impl, q.shape[-1])
    meta = (kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == "gpu":
        from jaxpaged.kernels.gpu_split import ragged_paged_attention_gpu_fused

        return ragged_paged_attention_gpu_fused(q, k_new, v_new, k_pages, v_pages, *meta, sm_scale=sm_scale,
                                                interpret=interpret)
    k_pages, v_pages = write_kv_pages(k_pages, v_pages, k_new, v_new, slot_mapping(k_pages.shape[1], *meta,
                                                                                   q.shape[0]))
    out = ragged_paged_attention(q, k_pages, v_pages, *meta, sm_scale=sm_scale, impl=impl, interpret=interpret)
    return out, k_pages, v_pages


def slot_mapping(page_size: int, kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens: int) -> jax.Array:
    """[T] int32 pool slot (page * page_size + offset) of each new token; padding tokens get PAD_SLOT."""
    seq_ids, positions, live = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    pos = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(page_indices[seq_ids], (pos // page_size)[:, None], axis=1,
                               mode="clip")[:, 0]
    return jnp.where(live, page * page_size + pos % page_size, PAD_SLOT).astype(jnp.int32)
