"""Blocked pure-JAX ragged paged attention: the fast CPU path (`impl="xla"`).

The reference gathers K/V once per query token, so a prefill chunk of T tokens gathers T copies of its sequence's
pages. Here a sequence with several new tokens is cut into blocks of `block_q` rows (`query_blocks`) that share
one gather of its pages; a loop visits only the live blocks, and each walks the pages only up to its last row
(the causal bound), so empty blocks and the masked upper triangle cost nothing. Sequences with one new token
(decode) skip the blocks: one vectorised pass attends all of them at once, a row per sequence, with
multiply-and-reduce instead of matmuls (a G-row matmul per KV head is mostly layout shuffling on CPU). Both passes
run an online softmax in float32 over steps of `block_pages` pages. The price is compile time: about three times
the reference's HLO per layer (on this 2-core CPU some 0.15 s more per layer and bucket, cold cache).
"""

import jax
import jax.numpy as jnp

from jaxpaged.kernels.reference import _MASK_VALUE, query_blocks, token_layout


def _gather(pages_flat: jax.Array, pages: jax.Array, page_size: int, num_kv_heads: int) -> jax.Array:
    """[..., bp * page_size, KVH, D] float32 K or V of `pages` [..., bp] from a pool flattened to [num_pages, -1]
    (a row gather: about twice as fast on CPU as gathering [page_size, KVH, D] slices)."""
    x = pages_flat[pages]  # [..., bp, page_size * KVH * D]
    return x.reshape(*pages.shape[:-1], -1, num_kv_heads, x.shape[-1] // (page_size * num_kv_heads))


def _softmax_step(m, l, s, mask, axis: int):
    """One online-softmax step over the keys on `axis` of scores s (masked where mask is False).

    Returns the new running max and sum, the block's probabilities and the rescale factor of the old accumulator.
    """
    s = jnp.where(mask, s, _MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=axis))
    p = jnp.exp(s - jnp.expand_dims(m_new, axis)) * mask  # * mask: a row may see no key of this block
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * l + p.sum(axis=axis), p, alpha


def _attend_block(
    q: jax.Array,         # [R, H, D] float32, scaled: R query rows of one sequence
    row_pos: jax.Array,   # [R] int32  position of each row
    table: jax.Array,     # [padded_pages] int32  the sequence's page table, a multiple of block_pages long
    num_keys: jax.Array,  # [] int32  keys to visit: the rows see positions < num_keys only
    k_flat: jax.Array,    # [num_pages, page_size * KVH * D]
    v_flat: jax.Array,
    page_size: int,
    block_pages: int,
) -> jax.Array:           # [R, H, D] float32
    """Causal attention of R rows of one sequence, gathering each step's pages once for all of them (matmuls)."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1] // (page_size * head_dim)
    qg = q.reshape(rows, num_kv_heads, -1, head_dim).transpose(1, 2, 0, 3)  # [KVH, G, R, D]
    block_len = block_pages * page_size

    def body(j, carry):
        m, l, acc = carry  # [KVH, G, R], [KVH, G, R], [KVH, G, R, D]
        pages = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages)  # [bp]
        k = _gather(k_flat, pages, page_size, num_kv_heads).astype(jnp.float32)  # [L, KVH, D]
        v = _gather(v_flat, pages, page_size, num_kv_heads).astype(jnp.float32)
        mask = j * block_len + jnp.arange(block_len) <= row_pos[:, None]  # [R, L]
        m, l, p, alpha = _softmax_step(m, l, jnp.einsum("kgrd,lkd->kgrl", qg, k), mask, axis=-1)
        return m, l, alpha[..., None] * acc + jnp.einsum("kgrl,lkd->kgrd", p, v)

    init = (
        jnp.full(qg.shape[:-1], _MASK_VALUE, jnp.float32),
        jnp.zeros(qg.shape[:-1], jnp.float32),
        jnp.zeros(qg.shape, jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, (num_keys + block_len - 1) // block_len, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(2, 0, 1, 3).reshape(rows, num_heads, head_dim)


def _prefill_pass(qf, table, kv_lens, cu_q_lens, num_seqs, is_decode, k_flat, v_flat, page_size: int,
                  block_pages: int, block_q: int) -> jax.Array:
    """Attention of the tokens of multi-token sequences, one live query block after another; [T, H, D] float32.

    qf [T, H, D] float32 scaled; is_decode [S] bool. Rows of decode sequences and padding tokens stay zero.
    """
    num_tokens = qf.shape[0]
    seq, start, lo, hi, pos0 = query_blocks(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q)  # [NB] each
    live = (hi > lo) & ~is_decode[seq]
    (order,) = jnp.nonzero(live, size=live.shape[0], fill_value=0)  # live blocks first
    q_pad = jnp.pad(qf, ((0, block_q), (0, 0), (0, 0)))  # [T + block_q, H, D]: a block may run past T
    r = jnp.arange(block_q)

    def body(i, out):  # out [T + block_q, H, D]
        b = order[i]
        rows = jax.lax.dynamic_slice_in_dim(q_pad, start[b], block_q)  # [bq, H, D]
        o = _attend_block(rows, pos0[b] + r, table[seq[b]], pos0[b] + hi[b], k_flat, v_flat, page_size,
                          block_pages)  # [bq, H, D]
        # NOTE: rows outside [lo, hi) belong to neighbouring sequences; keep what their own blocks wrote.
        old = jax.lax.dynamic_slice_in_dim(out, start[b], block_q)
        new = jnp.where(((r >= lo[b]) & (r < hi[b]))[:, None, None], o, old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, start[b], axis=0)

    out = jax.lax.fori_loop(0, live.sum(), body, jnp.zeros_like(q_pad))
    return out[:num_tokens]


def _decode_pass(qf, table, kv_lens, cu_q_lens, is_decode, k_flat, v_flat, page_size: int,
                 block_pages: int) -> jax.Array:  # [S, H, D] float32
    """Attention of the single new token of every decode sequence, vectorised over the S sequences.

    Walks the pages up to the longest decode sequence; other sequences' rows are garbage (never read).
    """
    num_seqs_max = kv_lens.shape[0]
    _, num_heads, head_dim = qf.shape
    num_kv_heads = k_flat.shape[1] // (page_size * head_dim)
    qg = qf[jnp.minimum(cu_q_lens[:-1], qf.shape[0] - 1)].reshape(num_seqs_max, 1, num_kv_heads, -1, head_dim)
    block_len = block_pages * page_size
    num_keys = jnp.where(is_decode, kv_lens, 0)  # [S]

    def body(j, carry):
        m, l, acc = carry  # [S, KVH, G], [S, KVH, G], [S, KVH, G, D]
        pages = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)  # [S, bp]
        k = _gather(k_flat, pages, page_size, num_kv_heads).astype(jnp.float32)[..., None, :]  # [S, L, KVH, 1, D]
        v = _gather(v_flat, pages, page_size, num_kv_heads).astype(jnp.float32)[..., None, :]
        mask = (j * block_len + jnp.arange(block_len) < num_keys[:, None])[..., None, None]  # [S, L, 1, 1]
        m, l, p, alpha = _softmax_step(m, l, (qg * k).sum(-1), mask, axis=1)  # p [S, L, KVH, G]
        return m, l, alpha[..., None] * acc + (p[..., None] * v).sum(1)

    shape = (num_seqs_max, num_kv_heads, num_heads // num_kv_heads)
    init = (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (jnp.max(num_keys) + block_len - 1) // block_len, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(num_seqs_max, num_heads, head_dim)


def default_block_q(num_tokens: int) -> int:
    """Query rows per prefill block: 64, or T for a smaller batch; see benchmarks/cpu_attention.py."""
    return min(64, num_tokens)


def ragged_paged_attention_xla(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,       # [S] int32
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    block_q: int | None = None,
    block_pages: int = 4,
) -> jax.Array:               # [T, num_q_heads, head_dim]; rows of padding tokens are zero
    """Same result as `ragged_paged_attention_reference`, K/V gathered once per query block or decode token.

    `block_q` (static) defaults to `default_block_q(T)`; `block_pages` is the pages per online-softmax step.
    """
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lens, page_indices, cu_q_lens, num_seqs = map(jnp.asarray, (kv_lens, page_indices, cu_q_lens, num_seqs))
    num_tokens = q.shape[0]
    page_size = k_pages.shape[1]
    max_pages = page_indices.shape[1]
    block_pages = min(block_pages, max_pages)
    table = jnp.pad(page_indices, ((0, 0), (0, (-max_pages) % block_pages)))  # pad with the null page
    kv = (k_pages.reshape(k_pages.shape[0], -1), v_pages.reshape(v_pages.shape[0], -1), page_size, block_pages)

    qf = q.astype(jnp.float32) * sm_scale
    live_seq = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    is_decode = live_seq & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)  # [S]
    out = _prefill_pass(qf, table, kv_lens, cu_q_lens, num_seqs, is_decode, *kv,
                        block_q or default_block_q(num_tokens))
    decoded = _decode_pass(qf, table, kv_lens, cu_q_lens, is_decode, *kv)
    seq_ids, _, live = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    out = jnp.where(is_decode[seq_ids][:, None, None], decoded[seq_ids], out)
    return jnp.where(live[:, None, None], out, 0.0).astype(q.dtype)
