"""KV write for NVIDIA GPUs in Pallas Triton: the step's new K/V rows stored into their page slots, in place.

XLA's scatter (`reference.write_kv_pages`) stores one element per thread; on a Hopper GPU it wrote the K and V of an
8192-token prefill step at about 0.4 TB/s (benchmarks/RESULTS.md). Here a program owns `block` tokens and stores
each token's `num_kv_heads * head_dim` values as one contiguous row of the pool seen as
[num_pages * page_size, num_kv_heads * head_dim] (the pages are aliased: a donated pool is updated in place).
Padding tokens (slot < 0) store nothing.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels.gpu_split import _store_rows


def supports(page_shape) -> bool:
    """Whether a pool of these page shapes takes the kernel: a row (num_kv_heads * head_dim) of a power of two."""
    width = page_shape[2] * page_shape[3]
    return width & (width - 1) == 0


def _kernel(slots_ref, k_ref, v_ref, k_in_ref, v_in_ref, k_out_ref, v_out_ref, *, block: int):
    del k_in_ref, v_in_ref  # aliased to the outputs: rows not written keep their values
    num_tokens = k_ref.shape[0]
    rows = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    src = jnp.minimum(rows, num_tokens - 1)
    slots = slots_ref[src]
    live = (rows < num_tokens) & (slots >= 0)
    _store_rows(k_out_ref, (), slots, k_ref[src, :], live)
    _store_rows(v_out_ref, (), slots, v_ref[src, :], live)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def write_kv_pages_gpu(
    k_pages: jax.Array,       # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,       # same shape as k_pages
    k: jax.Array,             # [T, num_kv_heads, head_dim]
    v: jax.Array,             # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [T] int32, page * page_size + offset; PAD_SLOT (-1): padding, written nowhere
    *,
    block: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`reference.write_kv_pages` as one Pallas Triton launch (see the module docstring)."""
    shape = k_pages.shape
    rows = (shape[0] * shape[1], shape[2] * shape[3])
    num_tokens = k.shape[0]
    k_out, v_out = pl.pallas_call(
        functools.partial(_kernel, block=block),
        grid=(pl.cdiv(num_tokens, block),),
        out_shape=[jax.ShapeDtypeStruct(rows, k_pages.dtype), jax.ShapeDtypeStruct(rows, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="kv_write")(
            slot_mapping.astype(jnp.int32), k.reshape(num_tokens, rows[1]).astype(k_pages.dtype),
            v.reshape(num_tokens, rows[1]).astype(v_pages.dtype), k_pages.reshape(rows), v_pages.reshape(rows))
    return k_out.reshape(shape), v_out.reshape(shape)
