"""Ragged paged attention for TPUs, Pallas Mosaic TPU: scalar-prefetched page tables, double-buffered page DMAs.

Design (after JAX's shipped TPU ragged paged attention and vllm-project/tpu-inference's RPA):
  - grid (num_query_blocks,): a program owns BQ new tokens of one sequence (block b of sequence s where
    `cu_q_lens[s] // BQ + s <= b`), for every query head. Which sequence, which tokens and which positions a block
    holds is computed by XLA before the call and passed, with the sequence lengths, as scalar prefetch (SMEM).
  - the page table stays in HBM: SMEM (1 MiB) cannot hold a whole [S, max_pages] table at long context (256
    sequences x 1,024 pages already fill it). When a program's sequence differs from the previous program's (the
    grid runs in order on one core), the used part of that sequence's row is DMA'd into an SMEM row buffer in
    128-entry windows aligned in the flattened table (Mosaic DMAs slice HBM at multiples of 128 words); the query
    blocks of one prefill share one fetch.
  - K/V pages stay in HBM. Each program walks its sequence's visible keys in blocks of `pages_per_block` pages
    (128 keys by default): the pages of block i + 1 are DMA'd (all KV heads of a page in one copy) into the other
    half of a double buffer in VMEM while block i is computed.
  - GQA: for each KV head, the rows of its G query heads x BQ tokens (M = G * BQ) meet the head's keys in one
    matmul; the head's keys are a (sublane-strided) load from the page buffer (K/V never repeated per head).
  - online softmax in float32; masked entries contribute exactly zero.
The queries are re-blocked ([blocks, KVH, M, D]) by an XLA gather before the call and the output rows gathered
back after it, so that every block is a rectangular VMEM tile with no partial writes.
This kernel is tested in the TPU interpret mode on CPU and compiled by libtpu for v4, v5e, v5p and v6e ahead of
time (tests/kernels/test_tpu_compile.py); it has not been run or timed on a TPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpaged.kernels.reference import query_blocks, token_layout

_MASK = -1e30
_WINDOW = 128  # page-table entries per DMA: HBM slices start at multiples of 128 int32 words


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Block sizes of the TPU kernel."""

    block_q: int = 16          # new tokens per program (a power of two, >= 8)
    pages_per_block: int | None = None  # pages per K/V block (the unit of DMA double buffering); None: 128 keys


def _kernel(seq_ref, count_ref, pos0_ref, kv_lens_ref,  # scalar prefetch (SMEM)
            q_ref,                                       # [KVH, M, D] VMEM block, rows g * BQ + token
            table_hbm,                                   # [windows, _WINDOW] int32 in HBM: the flat table
            k_hbm, v_hbm,                                # [num_pages, page_size, KVH, D] in HBM
            o_ref,                                       # [KVH, M, D] VMEM block
            k_buf, v_buf,                                # [2, P, page_size, KVH, D] VMEM double buffers
            sems,                                        # DMA semaphores [2 (k, v), 2 (buffer)]
            row_buf, row_seq, row_sem,                   # SMEM row windows, [1] their sequence; DMA sem
            *, block_q: int, scale: float, max_pages: int):
    b = pl.program_id(0)
    num_kv_heads, rows, head_dim = q_ref.shape
    _, pages_per_block, page_size, _, _ = k_buf.shape
    block_k = pages_per_block * page_size
    seq, count, pos0 = seq_ref[b], count_ref[b], pos0_ref[b]
    end = pos0 + count  # one past the last key any row of this block sees
    num_kv_blocks = jnp.where(count > 0, pl.cdiv(end, block_k), 0)

    @pl.when(b == 0)
    def _():
        row_seq[0] = -1

    row_start = seq * max_pages  # the row's first entry in the flattened table
    first_window = jax.lax.div(row_start, _WINDOW)  # lax.div: jnp's // lowers through sign, unknown off a TPU
    base = first_window * _WINDOW  # row_buf[j] holds flat table entry base + j

    @pl.when((count > 0) & (seq != row_seq[0]))
    def _():  # fetch the windows that hold the row's used entries
        def window(c):
            return pltpu.make_async_copy(table_hbm.at[first_window + c],
                                         row_buf.at[pl.ds(pl.multiple_of(c * _WINDOW, _WINDOW), _WINDOW)],
                                         row_sem.at[0])

        n = pl.cdiv(row_start - base + pl.cdiv(kv_lens_ref[seq], page_size), _WINDOW)
        jax.lax.fori_loop(0, n, lambda c, _: window(c).start(), None)
        jax.lax.fori_loop(0, n, lambda c, _: window(c).wait(), None)
        row_seq[0] = seq

    def copies(i, slot):
        """The 2 * P page copies of key block i into buffer `slot` (pages past the table read page 0)."""
        out = []
        for p in range(pages_per_block):
            idx = i * pages_per_block + p
            page = row_buf[row_start - base + jnp.minimum(idx, max_pages - 1)]
            page = jnp.where(idx < max_pages, page, 0)
            out.append(pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, p], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, p], sems.at[1, slot]))
        return out

    @pl.when(num_kv_blocks > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    row_pos = pos0 + (r & (block_q - 1))  # [M, 1] position of each row's token
    row_live = (r & (block_q - 1)) < count

    def body(i, carry):
        slot = i & 1

        @pl.when(i + 1 < num_kv_blocks)
        def _():
            for c in copies(i + 1, 1 - slot):
                c.start()

        for c in copies(i, slot):
            c.wait()
        key_pos = i * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = (key_pos <= row_pos) & row_live  # [M, BK]; key_pos <= row_pos < end
        new = []
        for h in range(num_kv_heads):
            m, l, acc = carry[h]  # [M, 1], [M, 1], [M, D] float32
            k = k_buf[slot, :, :, h, :].reshape(block_k, head_dim)  # [BK, D]: KV head h of every page
            v = v_buf[slot, :, :, h, :].reshape(block_k, head_dim)
            s = jax.lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale  # [M, BK]
            s = jnp.where(mask, s, _MASK)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            v = jnp.where(key_pos.reshape(block_k, 1) < end, v, jnp.zeros_like(v))  # unwritten slots may be NaN
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            new.append((m_new, alpha * l + p.sum(axis=1, keepdims=True), alpha * acc + pv))
        return tuple(new)

    init = tuple((jnp.full((rows, 1), _MASK, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                  jnp.zeros((rows, head_dim), jnp.float32)) for _ in range(num_kv_heads))
    carry = jax.lax.fori_loop(0, num_kv_blocks, body, init)
    for h, (_, l, acc) in enumerate(carry):
        o_ref[h] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config"))
def ragged_paged_attention_tpu(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # same shape as k_pages
    kv_lens: jax.Array,       # [S] int32
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    interpret: bool = False,
    config: TpuConfig = TpuConfig(),
) -> jax.Array:               # [T, num_q_heads, head_dim]; rows past cu_q_lens[num_seqs] are zero
    """`ragged_paged_attention` (see jaxpaged.kernels.ops) as a Mosaic TPU kernel; K/V already in the pages.

    `interpret=True` runs it in Pallas' TPU interpret mode (DMAs and semaphores simulated on CPU).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = page_indices.shape[1]
    group, bq = num_heads // num_kv_heads, config.block_q
    if num_heads % num_kv_heads or bq < 8 or bq & (bq - 1):
        raise ValueError(f"need num_heads % num_kv_heads == 0 and a power-of-two block_q >= 8, got q {q.shape}, "
                         f"pages {k_pages.shape}, {config}")
    kv_lens, page_indices, cu_q_lens, num_seqs = (x.astype(jnp.int32) for x in
                                                  (kv_lens, page_indices, cu_q_lens, num_seqs))
    seq, tok0, _, count, pos0 = query_blocks(kv_lens, cu_q_lens, num_seqs, num_tokens, bq)  # align 1: lo == 0
    num_blocks = seq.shape[0]
    rows = group * bq

    tok = jnp.minimum(tok0[:, None] + jnp.arange(bq, dtype=jnp.int32), num_tokens - 1)  # [NB, BQ]
    q_blocks = q[tok].reshape(num_blocks, bq, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(0, 2, 3, 1, 4).reshape(num_blocks, num_kv_heads, rows, head_dim)
    block = pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda b, *_: (b, 0, 0, 0))
    # 128 keys per block by default: 8 pages of 16; one page of 128 (8 pages of 128 overflow v5e's 16 MiB of VMEM)
    pages_per_block = config.pages_per_block or max(1, 128 // page_size)
    kv_buf = pltpu.VMEM((2, pages_per_block, page_size, num_kv_heads, head_dim), k_pages.dtype)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    table = page_indices.reshape(-1)
    table = jnp.pad(table, (0, -table.shape[0] % _WINDOW)).reshape(-1, _WINDOW)  # one copy per step under jit CSE
    row_windows = pl.cdiv(_WINDOW - 1 + max_pages, _WINDOW) * _WINDOW  # a row starts anywhere in its first window
    out_blocks = pl.pallas_call(
        functools.partial(_kernel, block_q=bq, scale=sm_scale, max_pages=max_pages),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_blocks,),
            in_specs=[block, hbm, hbm, hbm],
            out_specs=block,
            scratch_shapes=[kv_buf, kv_buf, pltpu.SemaphoreType.DMA((2, 2)), pltpu.SMEM((row_windows,), jnp.int32),
                            pltpu.SMEM((1,), jnp.int32), pltpu.SemaphoreType.DMA((1,))],
        ),
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="rpa_tpu",
    )(seq, count, pos0, kv_lens, q_blocks, table, k_pages, v_pages)

    # token t sits in block first_block[seq_t] + (t - cu[seq_t]) // BQ, row g * BQ + (t - cu[seq_t]) % BQ
    seq_t, _, live = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    off = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq_t]
    b_t = cu_q_lens[seq_t] // bq + seq_t + off // bq
    out = out_blocks.reshape(num_blocks, num_kv_heads, group, bq, head_dim)[b_t, :, :, off % bq]
    return jnp.where(live[:, None, None], out.reshape(num_tokens, num_heads, head_dim), 0).astype(q.dtype)
