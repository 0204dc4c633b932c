"""The Mosaic TPU kernel (`jaxpaged.kernels.tpu`) against the float64 oracle in Pallas' TPU interpret mode, and its
lowering to Mosaic for TPU (`jax.export`) on this CPU machine.

Tolerances as in test_gpu_kernel.py: max abs error 2e-5 for float32 inputs, 2e-2 for bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.kernels import ragged_paged_attention
from jaxpaged.kernels.tpu import TpuConfig, ragged_paged_attention_tpu
from tests.kernels.test_gpu_kernel import CASES, MIXES, SHAPES, assert_close, build

SMALL = TpuConfig(block_q=8, pages_per_block=2)  # several query and key blocks per sequence on small shapes


def check(q_lens, kv_lens, *, config=SMALL, atol=None, **kw):
    b = build(q_lens, kv_lens, **kw)
    out = ragged_paged_attention_tpu(*b.args(), sm_scale=b.q.shape[-1] ** -0.5, interpret=True, config=config)
    assert_close(out, b, atol or (2e-5 if b.q.dtype == np.float32 else 2e-2))


@pytest.mark.parametrize("case", CASES)
def test_ragged_batches_match_oracle(case):
    check(*CASES[case])


@pytest.mark.parametrize("q_lens,kv_lens,kw", SHAPES.values(), ids=SHAPES)
def test_page_sizes_gqa_head_dims_bfloat16(q_lens, kv_lens, kw):
    check(q_lens, kv_lens, **kw)


def test_batch_mix_changes_do_not_recompile():
    config = TpuConfig(block_q=8, pages_per_block=1)  # compiled by no other test
    before = ragged_paged_attention_tpu._cache_size()
    for q_lens, kv_lens, pad_seqs in MIXES:
        check(q_lens, kv_lens, config=config, pad_seqs=pad_seqs)
    assert ragged_paged_attention_tpu._cache_size() == before + 1


def test_page_table_rows_spanning_windows():
    """Rows of 300 pages: most start inside a 128-entry window and span three or four of them."""
    check([5, 1, 9], [3000, 4700, 4790], page_size=16, heads=(4, 2))


def test_default_config_and_no_padding():
    check([40, 1, 1], [70, 200, 9], config=TpuConfig(), pad_seqs=0)


def test_padding_rows_are_zero_and_garbage_past_lengths_is_ignored():
    b = build([3, 1], [10, 21], page_size=8)
    live_slots = np.zeros(b.k_pages.shape[:2], bool)
    for s in range(int(b.num_seqs[0])):
        n = int(b.kv_lens[s])
        for pos in range(n):
            live_slots[b.page_indices[s, pos // 8], pos % 8] = True
    b.k_pages[~live_slots] = np.nan  # the null page, unused pages and slots past each length
    b.v_pages[~live_slots] = np.nan
    out = ragged_paged_attention_tpu(*b.args(), sm_scale=0.125, interpret=True, config=SMALL)
    assert_close(out, b, 2e-5)
    np.testing.assert_array_equal(np.asarray(out)[int(b.cu_q_lens[b.num_seqs[0]]):], 0)


def test_ops_entry_point_dispatches_to_tpu():
    b = build([2, 1], [6, 17])
    out = ragged_paged_attention(*b.args(), sm_scale=0.125, impl="tpu", interpret=True)
    assert_close(out, b, 2e-5)


def test_rejects_a_block_q_that_is_not_a_power_of_two():
    b = build([1], [4])
    with pytest.raises(ValueError, match="power-of-two block_q"):
        ragged_paged_attention_tpu(*b.args(), sm_scale=0.125, interpret=True, config=TpuConfig(block_q=12))


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 40)), min_size=1, max_size=4),
       st.sampled_from([(4, 4), (6, 2), (8, 1)]), st.sampled_from([8, 16]), st.integers(0, 2))
def test_random_shapes(seqs, heads, page_size, pad_seqs):
    q_lens = [q for q, _ in seqs]
    kv_lens = [q + cached for q, cached in seqs]
    check(q_lens, kv_lens, heads=heads, page_size=page_size, pad_seqs=pad_seqs)


def abstract_args(heads, head_dim, page_size, dtype, sharding=None, seqs=16, pages=32, tokens=64, pool=512):
    """ShapeDtypeStructs of a kernel call: q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs."""
    shapes = [((tokens, heads[0], head_dim), dtype), ((pool, page_size, heads[1], head_dim), dtype),
              ((pool, page_size, heads[1], head_dim), dtype), ((seqs,), jnp.int32), ((seqs, pages), jnp.int32),
              ((seqs + 1,), jnp.int32), ((1,), jnp.int32)]
    return [jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for shape, dt in shapes]


@pytest.mark.parametrize("heads,head_dim,page_size,dtype", [
    ((32, 8), 128, 16, jnp.bfloat16), ((9, 3), 64, 16, jnp.bfloat16), ((8, 1), 64, 8, jnp.bfloat16),
    ((4, 4), 64, 32, jnp.float32), ((8, 2), 128, 16, jnp.float32)])
def test_lowers_to_mosaic_for_tpu(heads, head_dim, page_size, dtype):
    """jax.export for platforms=["tpu"] runs the Pallas-to-Mosaic lowering (test_tpu_compile.py compiles it)."""
    fn = functools.partial(ragged_paged_attention_tpu, sm_scale=head_dim ** -0.5)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*abstract_args(heads, head_dim, page_size, dtype))
    module = exported.mlir_module()
    assert "tpu_custom_call" in module
    assert exported.platforms == ("tpu",)
