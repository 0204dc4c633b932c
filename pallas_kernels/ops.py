"""The attention entry point the model calls, dispatching to the reference or a Pallas kernel."""

import jax

from jaxpaged.kernels.reference import ragged_paged_attention_reference

IMPLS = ("auto", "reference", "gpu", "tpu")


def resolve_impl(impl: str) -> str:
    """Maps "auto" to the implementation for `jax.default_backend()`; validates explicit names."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "reference")


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
) -> jax.Array:               # [T, num_q_heads, head_dim]; rows past cu_q_lens[num_seqs] are unspecified
    """Ragged paged attention over a batch mixing prefill chunks and decode tokens.

    Query i of sequence s sits at position `kv_lens[s] - q_len_s + i` and attends causally to positions
    0..itself. The new tokens' K/V must already be in the pages (`write_kv_pages`). Page 0 is the null page.
    `impl="auto"` picks the kernel for `jax.default_backend()`; `interpret=True` runs Pallas kernels in
    interpret mode (CPU tests).
    """
    impl = resolve_impl(impl)
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    if impl == "gpu":
        from jaxpaged.kernels.gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(*args, sm_scale=sm_scale, interpret=interpret)
    from jaxpaged.kernels.tpu import ragged_paged_attention_tpu

    return ragged_paged_attention_tpu(*args, sm_scale=sm_scale, interpret=interpret)
