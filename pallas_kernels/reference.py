"""Pure-JAX ragged paged attention: the oracle for the Pallas kernels and the CPU path of the engine.

It walks the page tables in blocks of `block_pages` pages with an online softmax (float32), so memory stays
O(T * block_pages * page_size) and work follows the longest live sequence, not the table width.
"""

import jax
import jax.numpy as jnp

PAD_SLOT = -1  # slot_mapping entry of a padding token: its K/V are written nowhere
_MASK_VALUE = -1e30  # finite: block 0 always holds position 0, so every live row sees a real score first
# The oracle computes in true float32: JAX's default precision lets a GPU use TF32 (and a TPU bf16 passes) in dots.
_HIGHEST = jax.lax.Precision.HIGHEST


def token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens: int):
    """Per-token sequence id, absolute position and liveness of a flat ragged batch.

    Returns seq_ids [T] int32, positions [T] int32 and live [T] bool (False for padding tokens).
    """
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs_max = kv_lens.shape[0]
    seq_ids = jnp.searchsorted(cu_q_lens[1:], tok, side="right", method="compare_all").astype(jnp.int32)
    seq_ids = jnp.minimum(seq_ids, num_seqs_max - 1)
    live = tok < cu_q_lens[num_seqs[0]]
    q_start = cu_q_lens[seq_ids]
    q_len = cu_q_lens[seq_ids + 1] - q_start
    positions = kv_lens[seq_ids] - q_len + (tok - q_start)
    return seq_ids, jnp.where(live, positions, -1), live


def query_blocks(kv_lens, cu_q_lens, num_seqs, num_tokens: int, block_q: int, align: int = 1):
    """Per query block b: its sequence, token of its row 0, live rows [lo, hi) and position of its row 0.

    Sequence s owns the blocks from `a_s // block_q + s` on, where a_s is cu_q_lens[s] rounded down to a multiple
    of `align` (a divisor of block_q), so `T // block_q + S` blocks cover any batch of T tokens in S sequences.
    With align > 1 a sequence's first block may start up to align - 1 rows before it (lo > 0 there); with
    align == 1, lo is 0. Returns five [num_blocks] int32 arrays; blocks past their sequence's tokens or of padding
    sequences have hi == lo.
    """
    num_seqs_max = kv_lens.shape[0]
    num_blocks = num_tokens // block_q + num_seqs_max
    starts = cu_q_lens[:-1] // align * align  # [S]
    first_block = starts // block_q + jnp.arange(num_seqs_max, dtype=jnp.int32)  # [S]
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.searchsorted(first_block, b, side="right", method="compare_all") - 1  # one fused compare, no loop
    seq = jnp.clip(seq, 0, num_seqs_max - 1).astype(jnp.int32)
    start = starts[seq] + (b - first_block[seq]) * block_q
    q_lo, q_hi = cu_q_lens[seq], cu_q_lens[seq + 1]
    lo = jnp.clip(q_lo - start, 0, block_q)
    hi = jnp.where(seq < num_seqs[0], jnp.clip(q_hi - start, lo, block_q), lo)
    pos0 = kv_lens[seq] - (q_hi - q_lo) + (start - q_lo)
    return seq, start, lo, hi, pos0


def ragged_paged_attention_reference(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,       # [S] int32
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    block_pages: int = 8,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Causal attention of each new token over its sequence's paged K/V (see `ragged_paged_attention`)."""
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_pages = page_indices.shape[1]
    block_pages = min(block_pages, max_pages)
    pad = (-max_pages) % block_pages
    table = jnp.pad(page_indices, ((0, 0), (0, pad)))  # pad with the null page

    seq_ids, positions, live = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    token_table = table[seq_ids]  # [T, padded_pages]
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    block_len = block_pages * page_size
    live_seq = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    max_kv = jnp.max(jnp.where(live_seq, kv_lens, 0))
    num_blocks = (max_kv + block_len - 1) // block_len

    def body(b, carry):
        m, l, acc = carry  # [T, KVH, G], [T, KVH, G], [T, KVH, G, D]
        pages = jax.lax.dynamic_slice_in_dim(token_table, b * block_pages, block_pages, axis=1)  # [T, bp]
        k = k_pages[pages].reshape(num_tokens, block_len, num_kv_heads, head_dim).astype(jnp.float32)
        v = v_pages[pages].reshape(num_tokens, block_len, num_kv_heads, head_dim).astype(jnp.float32)
        key_pos = b * block_len + jnp.arange(block_len)
        mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [T, 1, 1, L]
        s = jnp.einsum("tkgd,tlkd->tkgl", qg, k, precision=_HIGHEST)
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None]) * mask
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("tkgl,tlkd->tkgd", p, v, precision=_HIGHEST)
        return m_new, l, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), _MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.where(live[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def write_kv_pages(
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # same shape as k_pages
    k: jax.Array,             # [T, num_kv_heads, head_dim]
    v: jax.Array,             # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [T] int32, page * page_size + offset; PAD_SLOT (-1): padding, written nowhere
) -> tuple[jax.Array, jax.Array]:
    """Scatters the step's new K/V into their page slots; in place when the pool is donated.

    Padding tokens are dropped rather than written into one shared slot: thousands of writes to one address make
    the GPU scatter serialise on it (on an H200, 1.6 s of scatters in one 8192-token step that was mostly padding).
    Every index is distinct (a live token owns its slot; padding token i gets the out-of-range slot pool + i), so
    the scatter is declared `unique_indices`: XLA then stores the rows instead of updating them atomically.
    """
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    pad = flat[0] + jnp.arange(slot_mapping.shape[0], dtype=jnp.int32)  # [T] out of range, distinct: dropped
    slots = jnp.where(slot_mapping < 0, pad, slot_mapping)

    def write(pages, new):
        rows = pages.reshape(flat).at[slots].set(new.astype(pages.dtype), mode="drop", unique_indices=True)
        return rows.reshape(pages.shape)

    return write(k_pages, k), write(v_pages, v)
