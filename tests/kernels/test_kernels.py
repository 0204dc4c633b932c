"""Pallas kernels (interpret mode on CPU, compiled on a GPU) against the dense oracle: ragged batches, GQA ratios, dtypes.

Tolerances: float32 2e-5 abs (online softmax vs dense float64); bfloat16 inputs 2e-2 abs (bf16 P@V product).
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.kernels import ragged_paged_attention
from tests.kernels.oracle import attention_oracle, make_batch

IMPLS = ["gpu"]
INTERPRET = jax.default_backend() != "gpu"  # on a GPU machine the same cases run compiled

CASES = {  # name: (q_lens, kv_lens)
    "decode_only": ([1, 1, 1, 1], [5, 17, 40, 64]),
    "mixed_chunks_and_decode": ([7, 1, 20, 1], [7, 33, 50, 9]),
    "one_long_prefill": ([96], [96]),
    "chunk_on_cached_prefix": ([17], [61]),
}


def check(impl, q_lens, kv_lens, *, heads=(8, 2), head_dim=64, page_size=16, dtype=np.float32, pad_seqs=2,
          seed=0, atol=None):
    rng = np.random.default_rng(seed)
    max_pages = -(-max(kv_lens) // page_size) + 1
    b = make_batch(rng, q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                   page_size=page_size, max_pages=max_pages, pad_seqs=pad_seqs, pad_tokens=3)
    if dtype != np.float32:
        import ml_dtypes

        b.q, b.k_pages, b.v_pages = (x.astype(ml_dtypes.bfloat16) for x in (b.q, b.k_pages, b.v_pages))
    scale = head_dim ** -0.5
    out = np.asarray(ragged_paged_attention(*b.args(), sm_scale=scale, impl=impl, interpret=INTERPRET), np.float32)
    live = int(b.cu_q_lens[b.num_seqs[0]])
    b.q, b.k_pages, b.v_pages = (np.asarray(x, np.float32) for x in (b.q, b.k_pages, b.v_pages))
    np.testing.assert_allclose(out[:live], attention_oracle(b, scale)[:live], atol=atol or 2e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_ragged_batches(impl, case):
    check(impl, *CASES[case])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_page_sizes(impl, page_size):
    check(impl, [5, 1, 1], [21, 40, 3], page_size=page_size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 64), ((9, 3), 64), ((8, 2), 128), ((16, 2), 128)])
def test_gqa_ratios_and_head_dims(impl, heads, head_dim):
    check(impl, [3, 1, 6], [3, 30, 22], heads=heads, head_dim=head_dim)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    check(impl, [9, 1, 1], [9, 37, 12], dtype="bfloat16", atol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_padding_sequences(impl):
    check(impl, [4, 1], [4, 19], pad_seqs=0)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=4),
       st.sampled_from([(4, 1), (6, 2), (8, 8)]), st.sampled_from([8, 16]), st.integers(0, 3))
def test_random_shapes(seqs, heads, page_size, pad_seqs):
    q_lens = [q for q, _ in seqs]
    kv_lens = [q + cached for q, cached in seqs]
    for impl in IMPLS:
        check(impl, q_lens, kv_lens, heads=heads, page_size=page_size, pad_seqs=pad_seqs)
