"""The split-K Triton kernel (`jaxpaged.kernels.gpu_split`) against the float64 oracle, in interpret mode on CPU.

Tolerances (max abs error; outputs are convex mixes of unit-normal V rows, so O(1)):
  float32 inputs: 2e-5 (online softmax in float32 vs dense float64);
  bfloat16 inputs: 2e-2 (the oracle sees the same bf16-rounded inputs; P is rounded to bf16 before P @ V).
`-m gpu` runs the same checks compiled on a GPU (the device machine).
"""

import dataclasses
import functools

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.kernels import write_kv_pages
from jaxpaged.kernels.gpu_split import GpuConfig, ragged_paged_attention_gpu, ragged_paged_attention_gpu_fused
from tests.kernels.oracle import attention_oracle, make_batch

CASES = {  # name: (q_lens, kv_lens)
    "decode_only": ([1, 1, 1, 1], [5, 17, 40, 64]),
    "mixed_chunks_and_decode": ([7, 1, 20, 1], [7, 33, 50, 9]),
    "one_long_prefill": ([80], [80]),
    "chunk_on_cached_prefix": ([17, 2], [61, 2]),
}
SHAPES = {  # name: (q_lens, kv_lens, build kwargs), shared with the TPU kernel's tests
    **{f"page_size_{p}": ([5, 1, 1], [21, 40, 3], {"page_size": p}) for p in (8, 16, 32)},
    **{f"heads_{h}_{kvh}_dim_{d}": ([3, 1, 6], [3, 30, 22], {"heads": (h, kvh), "head_dim": d})
       for h, kvh, d in [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 64)]},  # GQA 1, 3, 4, 8
    **{f"bfloat16_heads_{h}_{kvh}": ([9, 1, 1], [9, 37, 12], {"heads": (h, kvh), "dtype": "bfloat16"})
       for h, kvh in [(8, 2), (9, 3)]},
}
MIXES = [  # (q_lens, kv_lens, pad_seqs): always 8 new tokens, 6 sequence slots, 10 pages of 16, 5 per table row
    ([1, 1, 1, 5], [5, 17, 40, 64], 2),  # decodes and a chunk
    ([2, 2, 2, 2], [2, 30, 64, 40], 2),  # prefill chunks only
    ([5, 1, 1, 1], [64, 3, 17, 40], 2),
    ([4, 3, 1], [64, 64, 32], 3),        # fewer live sequences
]
SMALL = GpuConfig(prefill_rows=16, prefill_block_k=16, decode_block_k=16, min_blocks_per_split=1)


def build(q_lens, kv_lens, *, heads=(8, 2), head_dim=64, page_size=16, dtype=np.float32, pad_seqs=2, seed=0):
    rng = np.random.default_rng(seed)
    max_pages = -(-max(kv_lens) // page_size) + 1
    b = make_batch(rng, q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                   page_size=page_size, max_pages=max_pages, pad_seqs=pad_seqs, pad_tokens=3)
    if dtype != np.float32:
        b.q, b.k_pages, b.v_pages = (x.astype(ml_dtypes.bfloat16) for x in (b.q, b.k_pages, b.v_pages))
    return b


def expected(b):
    f32 = dict(q=b.q.astype(np.float32), k_pages=b.k_pages.astype(np.float32), v_pages=b.v_pages.astype(np.float32))
    ref = type(b)(**{**b.__dict__, **f32})
    return attention_oracle(ref, b.q.shape[-1] ** -0.5)


def assert_close(out, b, atol):
    live = int(b.cu_q_lens[b.num_seqs[0]])
    out = np.asarray(out, np.float32)[:live]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected(b)[:live], atol=atol, rtol=0)


def check(q_lens, kv_lens, *, config=SMALL, interpret=True, atol=None, decode_only=False, **kw):
    b = build(q_lens, kv_lens, **kw)
    out = ragged_paged_attention_gpu(*b.args(), sm_scale=b.q.shape[-1] ** -0.5, interpret=interpret, config=config,
                                     decode_only=decode_only)
    assert_close(out, b, atol or (2e-5 if b.q.dtype == np.float32 else 2e-2))


def new_token_slots(b):
    """Slots and (seq, position) of every live new token, in token order."""
    page_size = b.k_pages.shape[1]
    slots = []
    for s in range(int(b.num_seqs[0])):
        lo, hi, n = int(b.cu_q_lens[s]), int(b.cu_q_lens[s + 1]), int(b.kv_lens[s])
        for pos in range(n - (hi - lo), n):
            slots.append(int(b.page_indices[s, pos // page_size]) * page_size + pos % page_size)
    return np.array(slots, np.int64)


def check_fused(q_lens, kv_lens, *, config=SMALL, interpret=True, atol=None, **kw):
    """Fused call on pages whose new-token slots hold NaN: output and written pages must equal the plain path."""
    b = build(q_lens, kv_lens, **kw)
    num_pages, page_size, kvh, d = b.k_pages.shape
    slots = new_token_slots(b)
    t = b.q.shape[0]
    k_new = np.zeros((t, kvh, d), b.k_pages.dtype)
    v_new = np.zeros_like(k_new)
    k_new[: len(slots)] = b.k_pages.reshape(-1, kvh, d)[slots]
    v_new[: len(slots)] = b.v_pages.reshape(-1, kvh, d)[slots]
    k_holes, v_holes = b.k_pages.copy(), b.v_pages.copy()
    k_holes.reshape(-1, kvh, d)[slots] = np.nan
    v_holes.reshape(-1, kvh, d)[slots] = np.nan
    out, k_pages, v_pages = ragged_paged_attention_gpu_fused(
        b.q, k_new, v_new, k_holes, v_holes, *b.args()[3:], sm_scale=d ** -0.5, interpret=interpret, config=config)
    assert_close(out, b, atol or (2e-5 if b.q.dtype == np.float32 else 2e-2))
    np.testing.assert_array_equal(np.asarray(k_pages), b.k_pages)  # padding tokens wrote nothing
    np.testing.assert_array_equal(np.asarray(v_pages), b.v_pages)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_only_hint_skips_the_prefill_launch_with_the_same_output(splits):
    config = dataclasses.replace(SMALL, decode_splits=splits)
    check(*CASES["decode_only"], config=config, decode_only=True)
    b = build(*CASES["decode_only"])
    jaxpr = jax.make_jaxpr(functools.partial(ragged_paged_attention_gpu, sm_scale=0.125, interpret=True,
                                             config=config, decode_only=True))(*b.args())
    assert "rpa_prefill" not in str(jaxpr) and "rpa_decode" in str(jaxpr)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits", [1, 4])
def test_ragged_batches_match_oracle(case, splits):
    check(*CASES[case], config=GpuConfig(**{**SMALL.__dict__, "decode_splits": splits}))


@pytest.mark.parametrize("q_lens,kv_lens,kw", SHAPES.values(), ids=SHAPES)
def test_page_sizes_gqa_head_dims_bfloat16(q_lens, kv_lens, kw):
    check(q_lens, kv_lens, **kw)


def test_batch_mix_changes_do_not_recompile():
    config = GpuConfig(**{**SMALL.__dict__, "decode_splits": 2})  # compiled by no other test
    before = ragged_paged_attention_gpu._cache_size()
    for q_lens, kv_lens, pad_seqs in MIXES:
        check(q_lens, kv_lens, config=config, pad_seqs=pad_seqs)
    assert ragged_paged_attention_gpu._cache_size() == before + 1


def test_default_config_tiles():
    check([40, 1, 1], [70, 200, 9], config=GpuConfig(decode_splits=2))


def test_no_padding_sequences_or_tokens():
    check([4, 1], [4, 19], pad_seqs=0)


@pytest.mark.parametrize("case", ["decode_only", "mixed_chunks_and_decode", "chunk_on_cached_prefix"])
def test_fused_kv_write_equals_write_then_attend(case):
    check_fused(*CASES[case], config=GpuConfig(**{**SMALL.__dict__, "decode_splits": 2}))


def test_fused_first_tokens_and_bfloat16():
    check_fused([1, 3], [1, 3], heads=(9, 3), dtype="bfloat16")


def test_fused_matches_write_kv_pages_slots():
    b = build([2, 1], [5, 9])
    slots = new_token_slots(b)
    k_new = np.random.default_rng(1).standard_normal((b.q.shape[0], *b.k_pages.shape[2:])).astype(np.float32)
    want_k, _ = write_kv_pages(b.k_pages, b.v_pages, k_new[: len(slots)], k_new[: len(slots)], slots)
    _, k_pages, _ = ragged_paged_attention_gpu_fused(b.q, k_new, k_new, b.k_pages, b.v_pages, *b.args()[3:],
                                                     sm_scale=0.125, interpret=True, config=SMALL)
    np.testing.assert_array_equal(np.asarray(k_pages), np.asarray(want_k))


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=4),
       st.sampled_from([(4, 1), (6, 2), (8, 8), (9, 3)]), st.sampled_from([8, 16]), st.integers(0, 3),
       st.sampled_from([1, 2]), st.booleans())
def test_random_shapes(seqs, heads, page_size, pad_seqs, splits, fused):
    q_lens = [q for q, _ in seqs]
    kv_lens = [q + cached for q, cached in seqs]
    config = GpuConfig(**{**SMALL.__dict__, "decode_splits": splits})
    (check_fused if fused else check)(q_lens, kv_lens, heads=heads, page_size=page_size, pad_seqs=pad_seqs,
                                      config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads,head_dim", [((32, 8), 128), ((9, 3), 64)])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_compiled_on_gpu(case, heads, head_dim, dtype):
    assert jax.default_backend() == "gpu"
    kw = dict(heads=heads, head_dim=head_dim, dtype=dtype, interpret=False, atol=1e-4 if dtype == np.float32 else 2e-2)
    configs = [GpuConfig(prefill_launch="triton"), GpuConfig(prefill_launch="triton", decode_splits=4)]
    if dtype == "bfloat16":  # the Mosaic GPU prefill launch takes bf16/f16 only
        configs.append(GpuConfig(prefill_launch="mosaic", decode_splits=4))
    for config in configs:
        check(*CASES[case], config=config, **kw)
        if case == "decode_only":
            check(*CASES[case], config=config, decode_only=True, **kw)
    check_fused(*CASES[case], config=GpuConfig(decode_splits=4), **kw)  # fused: always the Triton launch


@pytest.mark.parametrize("impl", ["reference", "gpu"])
def test_ops_fused_entry_point(impl):
    from jaxpaged.kernels.ops import ragged_paged_attention_fused

    b = build([3, 1], [7, 12], pad_seqs=1)
    slots = new_token_slots(b)
    kvh, d = b.k_pages.shape[2:]
    k_new = np.zeros((b.q.shape[0], kvh, d), np.float32)
    v_new = np.zeros_like(k_new)
    k_new[: len(slots)] = b.k_pages.reshape(-1, kvh, d)[slots]
    v_new[: len(slots)] = b.v_pages.reshape(-1, kvh, d)[slots]
    holes = b.k_pages.copy()
    holes.reshape(-1, kvh, d)[slots] = 0
    out, k_pages, _ = ragged_paged_attention_fused(b.q, k_new, v_new, holes, b.v_pages, *b.args()[3:],
                                                   sm_scale=d ** -0.5, impl=impl, interpret=True)
    assert_close(out, b, 2e-5)
    live_pages = np.unique(b.page_indices[: int(b.num_seqs[0])])
    live_pages = live_pages[live_pages > 0]
    np.testing.assert_array_equal(np.asarray(k_pages)[live_pages], b.k_pages[live_pages])
