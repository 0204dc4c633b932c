import functools

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels import ragged_paged_attention, ragged_paged_attention_reference, resolve_impl
from jaxpaged.kernels.xla_blocked import ragged_paged_attention_xla
from tests.kernels.oracle import make_batch

# q_lens, kv_lens, page_size, (heads, kv_heads), head_dim, block_q (None: the default)
CASES = {
    "decode": ([1, 1, 1, 1, 1], [1, 9, 40, 100, 130], 8, (4, 1), 64, None),
    "prefill": ([80, 25], [80, 25], 16, (6, 2), 128, 16),
    "mixed": ([7, 1, 20, 1, 3], [7, 33, 50, 90, 3], 16, (9, 3), 64, None),
    "mixed_small_blocks": ([7, 1, 20, 1, 3], [7, 33, 50, 90, 3], 8, (8, 2), 128, 4),
    "chunked_prefill": ([20, 1, 13], [70, 140, 13], 8, (2, 2), 64, 8),
}


def _check(name, dtype, rtol, atol):
    q_lens, kv_lens, page_size, (heads, kv_heads), head_dim, block_q = CASES[name]
    b = make_batch(np.random.default_rng(len(name)), q_lens, kv_lens, num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, page_size=page_size, max_pages=24, pad_seqs=2, pad_tokens=5, dtype=dtype)
    scale = head_dim ** -0.5
    ref = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=scale))(*b.args())
    out = jax.jit(functools.partial(ragged_paged_attention_xla, sm_scale=scale, block_q=block_q))(*b.args())
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    live = int(b.cu_q_lens[b.num_seqs[0]])
    np.testing.assert_allclose(out[:live], ref[:live], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(out[live:], 0.0)  # padding tokens


@pytest.mark.parametrize("name", CASES)
def test_xla_matches_reference_in_float32(name):
    _check(name, np.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["decode", "mixed_small_blocks"])
def test_xla_matches_reference_in_bfloat16(name):
    _check(name, ml_dtypes.bfloat16, rtol=2e-2, atol=2e-2)


def test_auto_picks_xla_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve_impl("auto", 64) == "xla"
    assert resolve_impl("reference", 64) == "reference"  # explicit choices are kept


def test_ops_dispatches_xla():
    b = make_batch(np.random.default_rng(1), [3, 1], [9, 20], num_heads=2, num_kv_heads=1, head_dim=16,
                   page_size=8, max_pages=4, pad_seqs=1, pad_tokens=2)
    out, ref = (jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.25, impl=impl))(*b.args())
                for impl in ("xla", "reference"))
    np.testing.assert_allclose(np.asarray(out)[:4], np.asarray(ref)[:4], rtol=1e-5, atol=1e-5)
