"""Prefill launch of the GPU ragged paged attention for Hopper: Mosaic GPU, warp-specialised (FlashAttention-3 style).

The Triton prefill launch of `gpu_split` is latency-bound (benchmarks/RESULTS.md: 255 registers, 2 programs per SM,
tensor pipe 43 % busy). This one follows JAX's shipped dense FA3 kernel (`pallas/ops/gpu/attention_mgpu.py`):
three warpgroups per program, two computing (64 query rows each, wgmma, online softmax in float32 base 2, taking
turns on the tensor cores through a schedule barrier) and one moving data (TMA into a `max_concurrent_steps`-deep
ring of K/V buffers, consumer barriers to recycle them). What differs is paging and raggedness:

- a program owns one query head and one query block of `2 * block_q` new tokens of ONE sequence (the blocks of
  `reference.query_blocks` aligned to 8 tokens, computed by XLA); blocks of decode tokens (q_len == 1) or of
  padding exit at once;
- each K/V block of `block_kv` keys is `block_kv // page_size` TMA copies, one per page, all arriving on the
  block's barrier; page ids are read from the page table in GMEM by the memory warpgroup;
- outputs are stored by TMA in power-of-two row pieces (as in JAX's ragged_dot_mgpu), so a block never writes
  rows of another sequence. Rows of decode tokens are left for the decode launch, which writes them in place.

NOTE: K/V slots past a sequence's length are multiplied by zero probabilities, not masked: they must hold finite
values (the engine's pool starts as zeros and is only written with K/V).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpaged.kernels.reference import query_blocks

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic GPU prefill launch."""

    block_q: int = 64               # rows per compute warpgroup (a program has two)
    block_kv: int = 128             # keys per pipeline step (whole pages)
    max_concurrent_steps: int = 2   # K/V ring depth


def supports(q_shape, page_shape, dtype, cfg: MosaicConfig = MosaicConfig()) -> bool:
    """Whether the launch takes these shapes: bf16/f16, head_dim % 64 == 0, pages of >= 8 that tile a K/V block."""
    page_size, head_dim = page_shape[1], q_shape[-1]
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 64 == 0
            and page_size % 8 == 0 and cfg.block_kv % page_size == 0)


def _block_meta(kv_lens, cu_q_lens, num_seqs, num_tokens: int, rows: int):
    """[5, num_blocks] int32 per query block: sequence, token of row 0 // 8, live rows [lo, hi), position of row 0.

    The blocks of `query_blocks` aligned to 8 tokens: Mosaic GPU wants the TMA row offset of a tiled copy provably
    a multiple of the 8-row tile, so a block may start up to 7 rows before its sequence (computed, not stored).
    Blocks of decode tokens (q_len == 1) are emptied (hi == lo): the decode launch owns them.
    """
    seq, start, lo, hi, pos0 = query_blocks(kv_lens, cu_q_lens, num_seqs, num_tokens, rows, align=8)
    hi = jnp.where(cu_q_lens[seq + 1] - cu_q_lens[seq] > 1, hi, lo)
    return jnp.stack([seq, start // 8, lo, hi, pos0]).astype(jnp.int32)


def _store_rows(o_smem, out_ref, head, row0, lo, hi, max_rows: int):
    """TMA-stores rows [lo, hi) of o_smem to out_ref[row0 + lo:row0 + hi, head] in power-of-two pieces."""
    start, num_rows = lo, hi - lo
    piece = max_rows
    while piece:
        @pl.when(num_rows & piece != 0)
        def _(start=start, piece=piece):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, piece)], out_ref.at[pl.ds(row0 + start, piece), head])
        start = start + (num_rows & piece)
        piece //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, out_ref, scoped, *, group, cfg, scale):
    """One query head x one query block: warpgroups 0 and 1 compute 64 rows each, warpgroup 2 loads K/V pages."""
    (qo_smem2, o_smem2, k_smem, v_smem), (k_bars, v_bars, q_bars), (k_free, v_free), sched = scoped
    block_q, block_kv, steps_ahead = cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps
    head, b, wg = lax.axis_index("heads"), lax.axis_index("blocks"), lax.axis_index("wg")
    seq, start, lo, hi, pos0 = (meta_ref[i, b] for i in range(5))
    start = start * 8  # provably a multiple of the 8-row tile
    active = hi > lo
    num_steps = pl.cdiv(pos0 + hi, jnp.int32(block_kv))  # key blocks the last live row needs

    def sched_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(active & (wg < 2))
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, o_smem = qo_smem2.at[wg], o_smem2.at[wg]
        r0 = wg * block_q
        row_lo, row_hi = jnp.clip(lo - r0, 0, block_q), jnp.clip(hi - r0, 0, block_q)  # live rows of this group
        row_pos = pos0 + r0  # position of this warpgroup's row 0 (negative for rows before the sequence)
        steps = jnp.where(row_hi > row_lo, pl.cdiv(row_pos + row_hi, jnp.int32(block_kv)), 0)
        # key blocks no live row masks (rows before row_lo are not stored)
        full_steps = jnp.clip(lax.div(row_pos + row_lo + 1, jnp.int32(block_kv)), 0, steps)
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(start + r0, block_q), head], qo_smem, q_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])
        m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, q_ref.shape[-1]), 0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_bars.at[0])

        pl.when(wg == 1)(sched_barrier)

        def step(i, carry, masked: bool):
            acc, m, l = carry
            slot = lax.rem(i, jnp.int32(steps_ahead))

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                sched_barrier()
                return acc_ref[...]

            s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))  # [BQ, BK]
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                r = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(row_pos + r >= i * block_kv + c, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1) * scale)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(k_smem.dtype)
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(sched)  # softmax done
            plgpu.barrier_wait(v_bars.at[slot])
            plgpu.barrier_wait(sched)  # the tensor cores are free

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = i + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(nxt, jnp.int32(steps_ahead))])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        def drain(i, _):  # steps the other warpgroup still needs: release their buffers, keep the turns
            slot = lax.rem(i, jnp.int32(steps_ahead))
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            sched_barrier()
            sched_barrier()

        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(steps, num_steps, drain, None)
        pl.when(wg == 0)(sched_barrier)

        acc /= lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), acc.shape, [0])
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        _store_rows(o_smem, out_ref, head, start + r0, row_lo, row_hi, block_q)

    @pl.when(active & (wg == 2))
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.int32(group))
        page_size, max_pages = k_ref.shape[1], table_ref.shape[1]
        per_block = block_kv // page_size

        def load(ref, smem, bars, i, slot):
            for j in range(per_block):  # one TMA per page, all on the block's barrier
                page = table_ref[seq, jnp.minimum(i * per_block + j, max_pages - 1)]
                plgpu.copy_gmem_to_smem(ref.at[page, :, kv_head], smem.at[slot, pl.ds(j * page_size, page_size)],
                                        bars.at[slot])

        for i in range(steps_ahead):
            @pl.when(i < num_steps)
            def _(i=i):
                load(k_ref, k_smem, k_bars, i, i)
                load(v_ref, v_smem, v_bars, i, i)

        @pl.loop(0, jnp.maximum(num_steps - steps_ahead, 0))
        def _(i):
            slot = lax.rem(i, jnp.int32(steps_ahead))
            plgpu.barrier_wait(k_free.at[slot])
            load(k_ref, k_smem, k_bars, i + steps_ahead, slot)
            plgpu.barrier_wait(v_free.at[slot])
            load(v_ref, v_smem, v_bars, i + steps_ahead, slot)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config"))
def prefill_attention_mosaic(
    q: jax.Array,             # [T, num_q_heads, head_dim] bf16 or f16
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim], same dtype
    v_pages: jax.Array,       # same shape as k_pages
    kv_lens: jax.Array,       # [S] int32, new tokens included
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    config: MosaicConfig = MosaicConfig(),
) -> jax.Array:               # [T, num_q_heads, head_dim]: rows of sequences with q_len > 1; others unwritten
    """Causal paged attention of the new tokens of every sequence with more than one new token (prefill chunks)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    if not supports(q.shape, k_pages.shape, q.dtype, config) or num_heads % num_kv_heads:
        raise ValueError(f"the Mosaic GPU prefill launch takes bf16/f16, head_dim % 64 == 0 and page sizes that "
                         f"are multiples of 8 dividing {config.block_kv}; got q {q.shape} {q.dtype}, "
                         f"pages {k_pages.shape}")
    pad = -num_tokens % 8  # TMA on tiled buffers wants the token axis a multiple of 8 (engine buckets are)
    if pad:
        return prefill_attention_mosaic(jnp.pad(q, ((0, pad), (0, 0), (0, 0))), k_pages, v_pages, kv_lens,
                                        page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                                        config=config)[:num_tokens]
    rows = 2 * config.block_q
    meta = _block_meta(kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32),
                       num_tokens, rows)
    steps_ahead, dtype = config.max_concurrent_steps, q.dtype
    tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    kv_buf = plgpu.SMEM((steps_ahead, config.block_kv, head_dim), dtype, **tiled)
    per_block = config.block_kv // k_pages.shape[1]

    def entry(meta_ref, table_ref, q_ref, k_ref, v_ref, out_ref):
        pl.run_scoped(
            lambda *scoped: _kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, out_ref, scoped, group=num_heads //
                                    num_kv_heads, cfg=config, scale=sm_scale * _LOG2E),
            (plgpu.SMEM((2, config.block_q, head_dim), dtype, **tiled), plgpu.SMEM((2, config.block_q, head_dim),
                                                                                   dtype), kv_buf, kv_buf),
            (plgpu.Barrier(num_arrivals=per_block, num_barriers=steps_ahead),
             plgpu.Barrier(num_arrivals=per_block, num_barriers=steps_ahead), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps_ahead),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(num_heads, meta.shape[1]),
        grid_names=("heads", "blocks"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(meta, page_indices.astype(jnp.int32), q, k_pages, v_pages)
