"""Ragged paged attention for GPUs in Pallas (Triton lowering).

One launch covers a batch mixing prefill chunks and decodes: the grid is (kv head, query block), where a query
block is up to `block_q` consecutive new tokens of one sequence (`blocks.query_blocks`, computed from runtime
arrays, so a change of prefill/decode mix never recompiles). All query heads of a KV group share the block: the
tile's rows are `block_q x group` (group padded to a power of two), so each K/V page is read once per block and
never repeated in memory. Keys are walked `pages_per_block` pages at a time through the page table, with an online
softmax in float32, stopping at the block's causal limit.

Why Triton and not Mosaic GPU: with jax 0.11.2 the Triton lowering supports gathers of whole pages through a
vector of page ids (`k_ref[pages]`) and runs in interpret mode on CPU; Mosaic GPU would need TMA descriptors per
page. Decoding long contexts at small batch would gain from a split over the key axis (not done yet).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels.blocks import num_query_blocks, query_blocks

_MASK_VALUE = -1e30


def _kernel(seq_ref, start_ref, count_ref, kv_lens_ref, cu_ref, pages_ref, q_ref, k_ref, v_ref, o_ref, *,
            block_q: int, group: int, pages_per_block: int, sm_scale: float, allow_tf32: bool):
    # q_ref / o_ref: [T + block_q, group, D] of this kv head; k_ref / v_ref: [num_pages, page_size, D]
    i = pl.program_id(1)
    count = count_ref[i]

    @pl.when(count > 0)
    def _():
        s = seq_ref[i]
        q0 = start_ref[i]
        kv_len = kv_lens_ref[s]
        first_pos = kv_len - (cu_ref[s + 1] - cu_ref[s]) + (q0 - cu_ref[s])
        head_dim = q_ref.shape[-1]
        page_size = k_ref.shape[1]
        block_k = pages_per_block * page_size
        rows = block_q * group
        q = q_ref[pl.ds(q0, block_q)].reshape(rows, head_dim)  # [rows, D]
        row_pos = first_pos + jnp.arange(rows, dtype=jnp.int32) // group
        num_kv = jnp.minimum(kv_len, first_pos + count)
        scale = sm_scale * math.log2(math.e)

        def body(j, carry):
            acc, m, l = carry  # [rows, D], [rows], [rows]
            pages = pages_ref[s, pl.ds(j * pages_per_block, pages_per_block)]
            k = k_ref[pages].reshape(block_k, head_dim)
            v = v_ref[pages].reshape(block_k, head_dim)
            scores = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32) * scale  # [rows, block_k] f32, log2 units
            key_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
            mask = key_pos[None, :] <= row_pos[:, None]
            scores = jnp.where(mask, scores, _MASK_VALUE)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.exp2(scores - m_new[:, None])
            alpha = jnp.exp2(m - m_new)
            l = alpha * l + p.sum(axis=-1)
            acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, allow_tf32=allow_tf32)
            return acc, m_new, l

        init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, _, l = jax.lax.fori_loop(0, pl.cdiv(num_kv, block_k), body, init)
        out = (acc / jnp.where(l > 0, l, 1.0)[:, None]).reshape(block_q, group, head_dim)
        live = jnp.arange(block_q) < count
        plgpu.store(o_ref.at[pl.ds(q0, block_q)], out.astype(o_ref.dtype),
                    mask=jnp.broadcast_to(live[:, None, None], out.shape))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "interpret"))
def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                               block_q: int | None = None, pages_per_block: int | None = None, num_warps: int = 4,
                               num_stages: int = 2, interpret: bool = False):
    """`ragged_paged_attention` on GPU (same arguments, see jaxpaged.kernels.ops)."""
    num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    group_pad = pl.next_power_of_2(group)
    block_q = block_q or max(1, 16 // group_pad)
    pages_per_block = pages_per_block or max(1, 64 // page_size)
    num_blocks = num_query_blocks(num_tokens, kv_lens.shape[0], block_q)
    blocks = query_blocks(cu_q_lens, num_seqs, block_q, num_blocks)
    table = jnp.pad(page_indices, ((0, 0), (0, (-page_indices.shape[1]) % pages_per_block)))
    # [KVH, T + block_q, group_pad, D]: heads of one KV group side by side, padded rows/heads never stored back
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qg = jnp.pad(qg, ((0, 0), (0, block_q), (0, group_pad - group), (0, 0)))
    full = lambda shape: pl.BlockSpec(shape, lambda h, i: (0,) * len(shape))  # noqa: E731
    kv_spec = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda h, i: (0, 0, h, 0))
    qo_spec = pl.BlockSpec((None, num_tokens + block_q, group_pad, head_dim), lambda h, i: (h, 0, 0, 0))
    kernel = functools.partial(_kernel, block_q=block_q, group=group_pad, pages_per_block=pages_per_block,
                               sm_scale=sm_scale, allow_tf32=q.dtype != jnp.float32)  # float32 stays exact
    out = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_blocks),
        in_specs=[full((num_blocks,)), full((num_blocks,)), full((num_blocks,)), full(kv_lens.shape),
                  full(cu_q_lens.shape), full(table.shape), qo_spec, kv_spec, kv_spec],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(blocks.seq, blocks.start, blocks.count, kv_lens, cu_q_lens, table, qg, k_pages, v_pages)
    out = out[:, :num_tokens, :group].transpose(1, 0, 2, 3)
    return out.reshape(num_tokens, num_heads, head_dim)
