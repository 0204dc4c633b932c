"""Ragged paged attention for NVIDIA GPUs: prefill tiles + split-K decode + fused KV write, in Pallas.

Two prefill launches. On Hopper with bf16/f16 and buckets of prefill size, `gpu_mosaic` (Mosaic GPU,
warp-specialised: TMA page copies into a K/V ring, two wgmma warpgroups taking turns) reached 0.81x and 0.96x
cuDNN's TFLOP/s on 2k/8k-token prefills on an H200; the Triton launch below, whose page gather per key row
(`k_ref[pages, offsets, h, :]`) is latency-bound (255 registers, 2 programs per SM, tensor pipe 43 % busy),
0.71-0.75x. Triton remains for decode-sized buckets, other dtypes, head_dims that are not multiples of 64, GPUs
without wgmma, the fused KV write and interpret mode. `prefill_launch` chooses; benchmarks/RESULTS.md has the
numbers. Decode is the Triton split-K launch everywhere: 0.74-0.92x the time of JAX's shipped Triton
paged_attention at 32/8 x 128 on an H100.

One call, up to three launches, all shapes static (a change of the prefill/decode mix never recompiles):
  1. prefill: grid (KVH, T // BQ + S). A program owns BQ new tokens of one sequence times the G query heads of
     one KV head (M = BQ * G rows, one tensor-core tile, BQ = M // G so no row is lost to padding G to a power
     of two), found by a binary search over `cu_q_lens[s] // BQ + s` (as vLLM's unified Triton attention does).
     Query blocks run last to first, so the longest causal tiles start first and short ones fill the tail.
     A block with no token of a sequence with more than one new token exits right after the search
     (`pl.when`): on a decode-only batch of 256 x 512 tokens the call takes 203 us instead of 239 us, with long
     prefills within 3 %. Looking the blocks up in XLA instead was as fast on decode but 8-25 % slower on
     prefill (benchmarks/RESULTS.md).
  2. decode: grid (S, KVH, splits). A program owns one decode token's G heads and one contiguous split of the
     sequence's key blocks (flash-decoding); split sizes follow each sequence's own length. With one split it
     writes the output rows itself.
  3. combine (splits > 1): grid (S,), merges only the splits a sequence used into its output row.
K/V are read in place from `[num_pages, page_size, num_kv_heads, head_dim]` pages, never repeated per query head.
The softmax is online, in float32, base 2.

The fused variant reads the cached context from the pages and the step's new tokens from `k_new`/`v_new`, and
each program writes its own new tokens into their slots (`input_output_aliases`): no program reads a slot that
another program of the call writes, so there is no race and no copy of the pool.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASK = -1e30
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tile sizes and launch parameters (see benchmarks/kernel_bench.py for the sweep)."""

    prefill_rows: int = 128       # M: new tokens x query heads of one KV group per program (power of two)
    prefill_block_k: int = 64     # keys per inner step
    prefill_warps: int = 4
    prefill_stages: int = 2
    decode_rows: int = 16         # tensor-core minimum; rows past G are dead
    decode_block_k: int | None = None  # None: 8192 // head_dim keys (16 KiB of bf16 K per block)
    decode_warps: int = 4
    decode_stages: int = 3
    decode_splits: int | None = None  # None: enough programs for ~4 waves of 132 SMs
    min_blocks_per_split: int = 2
    prefill_launch: str = "auto"  # "triton", "mosaic" (gpu_mosaic: Hopper, bf16/f16) or "auto" (prefill_launch())

    def __post_init__(self):
        if self.prefill_launch not in ("auto", "triton", "mosaic"):
            raise ValueError(f"prefill_launch={self.prefill_launch!r} is not one of 'auto', 'triton', 'mosaic'")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot(a, b, trans_b=False):
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32  # float32 stays IEEE, not tf32
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def _store_rows(ref, lead, rows, val, live):
    """ref[*lead, rows[i], :] = val[i] where live[i].

    Every index is an array so that interpret mode can discharge the store, and dead rows point out of bounds:
    interpret mode drops them even where their clamped indices repeat a live row's; Triton never stores them.
    """
    rows = jnp.where(live, rows, ref.shape[len(lead)])
    cols = jnp.arange(val.shape[-1], dtype=jnp.int32)[None, :]
    lead = tuple(jnp.asarray(x, jnp.int32)[..., None] if jnp.ndim(x) else x for x in lead)
    mask = jnp.broadcast_to(live[:, None], val.shape)
    plgpu.store(ref.at[(*lead, rows[:, None], cols)], val, mask=mask)


def _store_vec(ref, lead, rows, val, live):
    """ref[*lead, rows[i]] = val[i] where live[i] (dead rows out of bounds, as in `_store_rows`)."""
    rows = jnp.where(live, rows, ref.shape[len(lead)])
    plgpu.store(ref.at[(*lead, rows)], val, mask=live)


def _find_seq(cu_ref, b, block_q: int, num_seqs_max: int):
    """Largest s with cu_q_lens[s] // block_q + s <= b: the sequence that owns query block b."""
    lo, hi = jnp.int32(0), jnp.int32(num_seqs_max)
    for _ in range(max(1, math.ceil(math.log2(max(num_seqs_max, 2))))):
        mid = (lo + hi) // 2
        right = cu_ref[mid] // block_q + mid <= b
        lo, hi = jnp.where(right, mid, lo), jnp.where(right, hi, mid)
    return lo


def _softmax_step(carry, s, mask, v):
    """One online-softmax step over a key block; masked entries add exactly nothing."""
    m, l, acc = carry  # [M], [M], [M, D] float32
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, l, acc


def _attend(carry, q, row_pos, scale, load_block, lo, hi, n_full):
    """Online softmax over key blocks lo..hi-1; load_block(i) -> (k [BK, D], v [BK, D], kpos [BK], valid [BK]).

    Blocks below `n_full` are valid and visible to every live row: they skip the masks.
    """

    def full(i, carry):
        k, v, _, _ = load_block(i)
        s = _dot(q, k, trans_b=True) * scale  # [M, BK], log2 units
        m, l, acc = carry
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + _dot(p.astype(v.dtype), v)

    def masked(i, carry):
        k, v, kpos, valid = load_block(i)
        s = _dot(q, k, trans_b=True) * scale
        mask = (kpos[None, :] <= row_pos[:, None]) & valid[None, :]
        v = jnp.where(valid[:, None], v, 0)  # slots past the length may hold anything, NaN included
        return _softmax_step(carry, s, mask, v)

    mid = jnp.clip(n_full, lo, jnp.maximum(lo, hi))
    carry = jax.lax.fori_loop(lo, mid, full, carry)
    return jax.lax.fori_loop(mid, hi, masked, carry)


def _init(rows: int, head_dim: int):
    return (jnp.full((rows,), _MASK, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def _page_slots(table_ref, seq, kpos, page_size: int, max_pages: int):
    """Page ids and in-page offsets of key positions `kpos` of sequence `seq` (table reads clamped in range)."""
    pages = table_ref[seq, jnp.minimum(kpos // page_size, max_pages - 1)]
    return pages, kpos % page_size


def _page_loader(k_ref, v_ref, table_ref, seq, h, limit, block_k, max_pages):
    """Key block i (positions i * block_k + [0, block_k)) from the pages; valid below `limit`."""
    page_size = k_ref.shape[1]

    def load(i):
        kpos = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
        pages, offs = _page_slots(table_ref, seq, kpos, page_size, max_pages)
        return k_ref[pages, offs, h, :], v_ref[pages, offs, h, :], kpos, kpos < limit

    return load


def _new_loader(kn_ref, vn_ref, h, q_lo, ctx, limit, block_k):
    """Key block i of the step's new tokens (positions ctx + i * block_k + ...), read from k_new/v_new."""

    def load(i):
        j = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
        t = jnp.minimum(q_lo + j, kn_ref.shape[0] - 1)
        return kn_ref[t, h, :], vn_ref[t, h, :], ctx + j, ctx + j < limit

    return load


def _write_new_kv(kn_ref, vn_ref, ko_ref, vo_ref, table_ref, seq, h, q_lo, ctx, first, count, n: int):
    """Writes new tokens first..first+count-1 (count <= n) of sequence `seq`, KV head h, into their page slots."""
    j = first + jnp.arange(n, dtype=jnp.int32)
    live = jnp.arange(n) < count
    t = jnp.minimum(q_lo + j, kn_ref.shape[0] - 1)
    pages, offs = _page_slots(table_ref, seq, ctx + j, ko_ref.shape[1], table_ref.shape[1])
    heads = jnp.full((n,), h, jnp.int32)
    _store_rows(ko_ref, (pages, offs), heads, kn_ref[t, h, :], live)
    _store_rows(vo_ref, (pages, offs), heads, vn_ref[t, h, :], live)


def _prefill_kernel(kv_lens_ref, table_ref, cu_ref, nseq_ref, q_ref, k_ref, v_ref, *refs,
                    group, block_q, rows, block_k, scale, fused):
    """One query block (block_q tokens x group heads) of one sequence with more than one new token."""
    if fused:
        kn_ref, vn_ref, o_ref, ko_ref, vo_ref = refs
    else:
        (o_ref,) = refs
    num_tokens, head_dim = q_ref.shape[0], q_ref.shape[-1]
    max_pages = table_ref.shape[1]
    h, b = pl.program_id(0), pl.num_programs(1) - 1 - pl.program_id(1)  # last (longest) query blocks first
    seq = _find_seq(cu_ref, b, block_q, kv_lens_ref.shape[0])
    q_lo = cu_ref[seq]
    q_len = cu_ref[seq + 1] - q_lo
    ctx = kv_lens_ref[seq] - q_len
    q_start = (b - (q_lo // block_q + seq)) * block_q
    active = (seq < nseq_ref[0]) & (q_len > 1) & (q_start < q_len)

    @pl.when(active)
    def _():
        q_count = jnp.where(active, jnp.minimum(block_q, q_len - q_start), 0)

        r = jnp.arange(rows, dtype=jnp.int32)
        tok, g = r // group, r % group
        row_live = tok < q_count
        row_pos = jnp.where(row_live, ctx + q_start + tok, -1)
        t_idx = jnp.minimum(q_lo + q_start + tok, num_tokens - 1)
        heads = h * group + g
        q = q_ref[t_idx, heads, :]  # [M, D]
        end = ctx + q_start + q_count  # one past the last key any row sees
        carry = _init(rows, head_dim)
        if fused:
            load = _page_loader(k_ref, v_ref, table_ref, seq, h, ctx, block_k, max_pages)
            hi = jnp.where(active, pl.cdiv(ctx, block_k), 0)
            carry = _attend(carry, q, row_pos, scale, load, 0, hi, ctx // block_k)
            load = _new_loader(kn_ref, vn_ref, h, q_lo, ctx, end, block_k)
            hi = jnp.where(active, pl.cdiv(end - ctx, block_k), 0)
            carry = _attend(carry, q, row_pos, scale, load, 0, hi, (q_start + 1) // block_k)
            _write_new_kv(kn_ref, vn_ref, ko_ref, vo_ref, table_ref, seq, h, q_lo, ctx, q_start, q_count,
                          _pow2(block_q))
        else:
            load = _page_loader(k_ref, v_ref, table_ref, seq, h, end, block_k, max_pages)
            hi = jnp.where(active, pl.cdiv(end, block_k), 0)
            carry = _attend(carry, q, row_pos, scale, load, 0, hi, (ctx + q_start + 1) // block_k)
        _, l, acc = carry
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        _store_rows(o_ref, (t_idx,), heads, out.astype(o_ref.dtype), row_live)


def _split_range(kv_len, active, j, splits, block_k, min_blocks):
    """Key blocks [lo, hi) of split j, and how many splits the sequence uses."""
    n_blocks = jnp.where(active, pl.cdiv(kv_len, block_k), 0)
    per_split = jnp.maximum(pl.cdiv(n_blocks, splits), min_blocks)
    lo = j * per_split
    return lo, jnp.minimum(lo + per_split, n_blocks), pl.cdiv(n_blocks, per_split)


def _decode_kernel(kv_lens_ref, table_ref, cu_ref, nseq_ref, q_ref, k_ref, v_ref, *refs,
                   group, rows, block_k, scale, splits, min_blocks, fused):
    """The G heads of one decode token (q_len == 1) over one split of its keys."""
    refs = list(refs)
    kn_ref, vn_ref = (refs.pop(0), refs.pop(0)) if fused else (None, None)
    if splits == 1:
        refs.pop(0)  # the prefill launch's output, aliased to o_ref
        o_ref = refs.pop(0)
    else:
        o_ref, m_ref, l_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    num_tokens, head_dim = q_ref.shape[0], q_ref.shape[-1]
    s, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_lo = cu_ref[s]
    active = (s < nseq_ref[0]) & (cu_ref[s + 1] - q_lo == 1)
    kv_len = kv_lens_ref[s]
    ctx = kv_len - 1 if fused else kv_len  # keys read from the pages
    r = jnp.arange(rows, dtype=jnp.int32)
    row_live = active & (r < group)
    row_pos = jnp.where(row_live, kv_len - 1, -1)
    t = jnp.minimum(q_lo, num_tokens - 1)
    heads = h * group + jnp.minimum(r, group - 1)
    q = q_ref[t, heads, :]  # [M, D]
    lo, hi, _ = _split_range(ctx, active, j, splits, block_k, min_blocks)
    load = _page_loader(k_ref, v_ref, table_ref, s, h, ctx, block_k, table_ref.shape[1])
    carry = _attend(_init(rows, head_dim), q, row_pos, scale, load, lo, hi, ctx // block_k)
    if fused:
        first = jnp.where(active & (j == 0), kv_len - ctx, 0)  # 1 or 0 (int32 select: Triton-friendly)
        load = _new_loader(kn_ref, vn_ref, h, q_lo, ctx, kv_len, block_k)
        carry = _attend(carry, q, row_pos, scale, load, 0, first, 0)
        _write_new_kv(kn_ref, vn_ref, refs[0], refs[1], table_ref, s, h, q_lo, ctx, 0, first, 16)
    m, l, acc = carry
    if splits == 1:
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        _store_rows(o_ref, (t,), heads, out.astype(o_ref.dtype), row_live)
    else:
        _store_rows(o_ref, (j, s), heads, acc, row_live)
        _store_vec(m_ref, (j, s), heads, m, row_live)
        _store_vec(l_ref, (j, s), heads, l, row_live)


def _combine_kernel(kv_lens_ref, cu_ref, nseq_ref, op_ref, mp_ref, lp_ref, o_in_ref, o_ref, *,
                    heads_p, splits, block_k, min_blocks, fused):
    """Merges the splits one decode sequence used into its output row."""
    del o_in_ref  # aliased to o_ref: rows of other sequences stay as the prefill launch wrote them
    num_tokens, num_heads, head_dim = o_ref.shape
    s = pl.program_id(0)
    q_lo = cu_ref[s]
    active = (s < nseq_ref[0]) & (cu_ref[s + 1] - q_lo == 1)
    ctx = kv_lens_ref[s] - (1 if fused else 0)
    _, _, used = _split_range(ctx, active, 0, splits, block_k, min_blocks)
    used = jnp.where(active, jnp.maximum(used, 1), 0)  # a fused first token has no context: split 0 only
    r = jnp.arange(heads_p, dtype=jnp.int32)
    heads = jnp.minimum(r, num_heads - 1)

    def body(j, carry):
        m, l, acc = carry
        m_j, l_j = mp_ref[j, s, heads], lp_ref[j, s, heads]
        m_new = jnp.maximum(m, m_j)
        a, b = jnp.exp2(m - m_new), jnp.exp2(m_j - m_new)
        return m_new, a * l + b * l_j, a[:, None] * acc + b[:, None] * op_ref[j, s, heads, :]

    _, l, acc = jax.lax.fori_loop(0, used, body, _init(heads_p, head_dim))
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    live = active & (r < num_heads)
    _store_rows(o_ref, (jnp.minimum(q_lo, num_tokens - 1),), heads, out.astype(o_ref.dtype), live)


def decode_block_k(cfg: GpuConfig, head_dim: int) -> int:
    """Keys per decode block: the configured count, else 8192 // head_dim (at least 16)."""
    return cfg.decode_block_k or max(16, 8192 // head_dim)


def decode_splits(cfg: GpuConfig, num_seqs_max: int, num_kv_heads: int, max_kv: int, head_dim: int) -> int:
    """Static split count: ~4 waves of programs on 132 SMs, no more splits than key blocks allow."""
    if cfg.decode_splits is not None:
        return cfg.decode_splits
    most = max(1, pl.cdiv(pl.cdiv(max_kv, decode_block_k(cfg, head_dim)), cfg.min_blocks_per_split))
    want = pl.cdiv(4 * 132, num_seqs_max * num_kv_heads)
    return max(1, min(_pow2(want), _pow2(most)))


MOSAIC_MIN_TOKENS_PER_SEQ = 4  # token slots per sequence slot from which "auto" takes the Mosaic prefill launch


def prefill_launch(cfg: GpuConfig, q_shape, page_shape, dtype, num_seqs_max: int,
                   compute_capability: str | None) -> str:
    """"triton" or "mosaic": the prefill launch of a call of these static shapes.

    "auto" takes Mosaic GPU on Hopper (compute capability 9.x: wgmma) for shapes it supports, in buckets of at
    least `MOSAIC_MIN_TOKENS_PER_SEQ` tokens per sequence slot: there it is 0.81-0.96x cuDNN against the Triton
    launch's 0.71-0.75x, while on decode-only batches its empty programs (one per query head and block) cost
    +32 % (B=256, L=512; benchmarks/RESULTS.md, H200).
    """
    if cfg.prefill_launch != "auto":
        return cfg.prefill_launch
    from jaxpaged.kernels.gpu_mosaic import supports

    hopper = (compute_capability or "").split(".")[0] == "9"
    big = q_shape[0] >= MOSAIC_MIN_TOKENS_PER_SEQ * num_seqs_max
    return "mosaic" if hopper and big and supports(q_shape, page_shape, dtype) else "triton"


def _compute_capability() -> str | None:
    return getattr(jax.devices()[0], "compute_capability", None)


def _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, k_new, v_new, *, sm_scale, interpret,
         cfg: GpuConfig, decode_only: bool = False):
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs_max, max_pages = page_indices.shape
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"need num_heads % num_kv_heads == 0 and a power-of-two head_dim, got q {q.shape}, "
                         f"pages {k_pages.shape}")
    fused = k_new is not None
    scale = sm_scale * _LOG2E
    meta = (kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
            num_seqs.astype(jnp.int32))
    new = (k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype)) if fused else ()
    pages_out = [jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)] if fused else []
    params = lambda w, s: plgpu.CompilerParams(num_warps=w, num_stages=s)  # noqa: E731

    if decode_only and not fused:  # no sequence has a prefill chunk: the decode launch writes every live row
        out, pages = jnp.zeros(q.shape, q.dtype), []
    elif not fused and not interpret and prefill_launch(cfg, q.shape, k_pages.shape, q.dtype, num_seqs_max,
                                                        _compute_capability()) == "mosaic":
        from jaxpaged.kernels.gpu_mosaic import prefill_attention_mosaic

        out, pages = prefill_attention_mosaic(q, k_pages, v_pages, *meta, sm_scale=sm_scale), []
    else:
        rows = max(cfg.prefill_rows, _pow2(group))
        block_q = rows // group
        out, *pages = pl.pallas_call(
            functools.partial(_prefill_kernel, group=group, block_q=block_q, rows=rows,
                              block_k=cfg.prefill_block_k, scale=scale, fused=fused),
            grid=(num_kv_heads, num_tokens // block_q + num_seqs_max),
            out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + pages_out,
            input_output_aliases={5: 1, 6: 2} if fused else {},
            compiler_params=params(cfg.prefill_warps, cfg.prefill_stages),
            interpret=interpret, name="rpa_prefill")(*meta, q, k_pages, v_pages, *new)
    if fused:
        k_pages, v_pages = pages

    splits = decode_splits(cfg, num_seqs_max, num_kv_heads, max_pages * page_size, head_dim)
    block_k = decode_block_k(cfg, head_dim)
    if splits == 1:  # write the output rows in place of the prefill launch's
        outs, aliases, extra = [jax.ShapeDtypeStruct(q.shape, q.dtype)], {7 + len(new): 0}, (out,)
    else:
        outs = [jax.ShapeDtypeStruct((splits, num_seqs_max, num_heads, head_dim), jnp.float32),
                jax.ShapeDtypeStruct((splits, num_seqs_max, num_heads), jnp.float32),
                jax.ShapeDtypeStruct((splits, num_seqs_max, num_heads), jnp.float32)]
        aliases, extra = {}, ()
    if fused:
        aliases.update({5: len(outs), 6: len(outs) + 1})
    res = pl.pallas_call(
        functools.partial(_decode_kernel, group=group, rows=max(cfg.decode_rows, _pow2(group)),
                          block_k=block_k, scale=scale, splits=splits,
                          min_blocks=cfg.min_blocks_per_split, fused=fused),
        grid=(num_seqs_max, num_kv_heads, splits),
        out_shape=outs + pages_out,
        input_output_aliases=aliases,
        compiler_params=params(cfg.decode_warps, cfg.decode_stages),
        interpret=interpret, name="rpa_decode")(*meta, q, k_pages, v_pages, *new, *extra)
    if fused:
        k_pages, v_pages = res[-2:]
    if splits == 1:
        out = res[0]
    else:
        out = pl.pallas_call(
            functools.partial(_combine_kernel, heads_p=_pow2(num_heads), splits=splits,
                              block_k=block_k, min_blocks=cfg.min_blocks_per_split, fused=fused),
            grid=(num_seqs_max,),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            input_output_aliases={6: 0},
            compiler_params=params(4, 1),
            interpret=interpret, name="rpa_combine")(meta[0], meta[2], meta[3], *res[:3], out)
    return (out, k_pages, v_pages) if fused else out


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config", "decode_only"))
def ragged_paged_attention_gpu(
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
    config: GpuConfig = GpuConfig(),
    decode_only: bool = False,
) -> jax.Array:               # [T, num_q_heads, head_dim]; rows past cu_q_lens[num_seqs] are unspecified
    """`ragged_paged_attention` (see jaxpaged.kernels.ops) as Pallas Triton kernels; K/V already in the pages.
    `decode_only` (every sequence has one new token) skips the prefill launch, whose programs would all exit
    after their search (~10 us per call at 256 sequences, 5 % of a multi-step decode on an H200)."""
    return _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, None, None,
                sm_scale=sm_scale, interpret=interpret, cfg=config, decode_only=decode_only)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config"), donate_argnums=(3, 4))
def ragged_paged_attention_gpu_fused(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    k_new: jax.Array,         # [T, num_kv_heads, head_dim]  the step's new keys, token-aligned with q
    v_new: jax.Array,         # [T, num_kv_heads, head_dim]
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]  donated, updated in place
    v_pages: jax.Array,       # same shape as k_pages, donated
    kv_lens: jax.Array,       # [S] int32, new tokens included
    page_indices: jax.Array,  # [S, max_pages_per_seq] int32
    cu_q_lens: jax.Array,     # [S + 1] int32
    num_seqs: jax.Array,      # [1] int32
    *,
    sm_scale: float,
    interpret: bool = False,
    config: GpuConfig = GpuConfig(),
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [T, H, D], k_pages, v_pages
    """Attention plus the KV write of the step's new tokens (slots from the page table), in the same launches.

    Equals `write_kv_pages` then `ragged_paged_attention`; padding tokens write nothing.
    """
    return _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, k_new, v_new,
                sm_scale=sm_scale, interpret=interpret, cfg=config)
