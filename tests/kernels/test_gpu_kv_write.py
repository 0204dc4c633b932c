"""The Pallas Triton KV write (`jaxpaged.kernels.gpu_kv_write`) against XLA's scatter, in interpret mode on CPU;
`-m gpu` runs it compiled on a GPU (the device machine)."""

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels import PAD_SLOT, write_kv_pages
from jaxpaged.kernels.gpu_kv_write import supports, write_kv_pages_gpu
from jaxpaged.kernels.reference import write_kv_pages as write_kv_pages_xla


def pool_and_tokens(num_tokens: int, slots: list[int], *, kv_heads=2, head_dim=64, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    pages = rng.standard_normal((6, 8, kv_heads, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(dtype) for _ in range(2))
    slot_mapping = np.full(num_tokens, PAD_SLOT, np.int32)
    slot_mapping[: len(slots)] = slots
    return pages, k, v, slot_mapping


@pytest.mark.parametrize("num_tokens, slots, block", [
    (5, [8, 9, 10, 47, 16], 16),            # fewer tokens than a block; the last slot of the pool
    (40, list(range(8, 38)), 16),           # three blocks, the last partly padding
    (7, [33, PAD_SLOT, 12, PAD_SLOT], 4),   # padding between live tokens, then padding tokens
])
def test_equals_xla_scatter_and_leaves_other_slots(num_tokens, slots, block):
    pages, k, v, slot_mapping = pool_and_tokens(num_tokens, slots)
    want_k, want_v = write_kv_pages_xla(pages, -pages, k, v, slot_mapping)
    got_k, got_v = write_kv_pages_gpu(pages, -pages, k, v, slot_mapping, block=block, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    flat = np.asarray(got_k).reshape(48, -1)
    live = [s for s in slots if s >= 0]
    np.testing.assert_array_equal(flat[live], k[: len(slots)][np.array(slots) >= 0].reshape(len(live), -1))
    untouched = np.setdiff1d(np.arange(48), live)
    np.testing.assert_array_equal(flat[untouched], pages.reshape(48, -1)[untouched])


def test_bfloat16_pool_and_float32_tokens_are_cast():
    pages, k, v, slot_mapping = pool_and_tokens(3, [1, 2, 3])
    pages = pages.astype(ml_dtypes.bfloat16)
    got_k, _ = write_kv_pages_gpu(pages, pages, k, v, slot_mapping, interpret=True)
    assert got_k.dtype == pages.dtype
    np.testing.assert_array_equal(np.asarray(got_k).reshape(48, -1)[1:4],
                                  k.astype(ml_dtypes.bfloat16).reshape(3, -1))


def test_entry_point_takes_the_kernel_for_power_of_two_rows_only():
    assert supports((6, 8, 2, 64)) and supports((6, 8, 8, 128))
    assert not supports((6, 8, 3, 64))
    pages, k, v, slot_mapping = pool_and_tokens(4, [5, 6, PAD_SLOT, 7], kv_heads=3)
    got, _ = write_kv_pages(pages, pages, k, v, slot_mapping, impl="gpu", interpret=True)
    want, _ = write_kv_pages_xla(pages, pages, k, v, slot_mapping)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    pages, k, v, slot_mapping = pool_and_tokens(4, [5, 6, 7])
    jaxpr = jax.make_jaxpr(lambda *a: write_kv_pages(*a, impl="gpu", interpret=True))(pages, pages, k, v,
                                                                                      slot_mapping)
    assert "kv_write" in str(jaxpr)


@pytest.mark.gpu
def test_compiled_on_gpu_equals_xla_scatter():
    pages, k, v, slot_mapping = pool_and_tokens(300, list(range(40, 0, -1)) + [PAD_SLOT] * 10 + list(range(41, 47)),
                                                kv_heads=8, dtype=ml_dtypes.bfloat16)
    want = write_kv_pages_xla(pages, -pages, k, v, slot_mapping)
    got = write_kv_pages_gpu(pages, -pages, k, v, slot_mapping)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
