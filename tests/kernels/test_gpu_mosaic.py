"""The Mosaic GPU prefill launch (`jaxpaged.kernels.gpu_mosaic`).

Mosaic GPU's interpreter does not run wgmma, so on CPU the kernel is only lowered for CUDA (Pallas -> Mosaic GPU,
layout inference included; PTX is built on a GPU). `-m gpu` checks it compiled against the float64 oracle on
rows of sequences with more than one new token (bf16 inputs: max abs error 2e-2, as for the Triton kernel).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels.gpu_mosaic import _block_meta, prefill_attention_mosaic, supports
from jaxpaged.kernels.gpu_split import GpuConfig, prefill_launch
from tests.kernels.oracle import attention_oracle, make_batch

CASES = {  # name: (q_lens, kv_lens); decode tokens (q_len 1) are left to the decode launch
    "one_long_prefill": ([300], [300]),
    "chunks_on_cached_prefixes": ([77, 1, 130, 1, 9], [300, 40, 130, 17, 200]),
    "unaligned_starts": ([3, 5, 2, 129, 64], [3, 70, 2, 129, 500]),
    "long_context_chunk": ([64], [2100]),
}


def abstract(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("heads,head_dim,page_size,tokens", [((32, 8), 128, 16, 256), ((9, 3), 64, 16, 256),
                                                             ((8, 2), 128, 32, 69), ((4, 4), 64, 8, 16)])
def test_lowers_to_mosaic_gpu_on_cpu(heads, head_dim, page_size, tokens):
    h, kvh = heads
    args = (abstract((tokens, h, head_dim), jnp.bfloat16), abstract((64, page_size, kvh, head_dim), jnp.bfloat16),
            abstract((64, page_size, kvh, head_dim), jnp.bfloat16), abstract((4,), jnp.int32),
            abstract((4, 32), jnp.int32), abstract((5,), jnp.int32), abstract((1,), jnp.int32))
    lowered = prefill_attention_mosaic.trace(*args, sm_scale=head_dim ** -0.5).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_block_meta_covers_every_prefill_token_once():
    q_lens, kv_lens = [3, 5, 1, 129, 64, 1], [3, 70, 9, 129, 500, 4]
    cu = np.concatenate([[0], np.cumsum(q_lens + [0, 0])]).astype(np.int32)  # 2 padding sequences
    kv = np.array(kv_lens + [0, 0], np.int32)
    meta = np.asarray(_block_meta(jnp.asarray(kv), jnp.asarray(cu), jnp.asarray([6]), 208, 128))
    seen = {}
    for seq, start8, lo, hi, pos0 in meta.T:
        for r in range(lo, hi):
            tok = start8 * 8 + r
            assert tok not in seen and cu[seq] <= tok < cu[seq + 1]
            seen[tok] = pos0 + r
    prefill = {t: kv_lens[s] - q_lens[s] + t - cu[s] for s in range(6) if q_lens[s] > 1 for t in range(cu[s], cu[s + 1])}
    assert seen == prefill  # every token of a multi-token sequence, at its position; decode tokens none


def test_supports_only_what_the_kernel_takes():
    assert supports((8, 4, 128), (9, 16, 2, 128), jnp.bfloat16)
    assert not supports((8, 4, 128), (9, 16, 2, 128), jnp.float32)
    assert not supports((8, 4, 48), (9, 16, 2, 48), jnp.bfloat16)
    assert not supports((8, 4, 64), (9, 4, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim % 64"):
        prefill_attention_mosaic(*(np.zeros(s, np.float32) for s in [(8, 4, 64), (9, 16, 2, 64), (9, 16, 2, 64)]),
                                 np.ones(1, np.int32), np.ones((1, 1), np.int32), np.array([0, 8], np.int32),
                                 np.ones(1, np.int32), sm_scale=0.125)


def test_auto_takes_mosaic_for_prefill_buckets_on_hopper_only():
    bf16 = jnp.bfloat16
    pages = (100, 16, 8, 128)
    assert prefill_launch(GpuConfig(), (2048, 32, 128), pages, bf16, 64, "9.0") == "mosaic"
    assert prefill_launch(GpuConfig(), (256, 32, 128), pages, bf16, 256, "9.0") == "triton"  # decode bucket
    assert prefill_launch(GpuConfig(), (2048, 32, 128), pages, bf16, 64, "8.0") == "triton"  # no wgmma
    assert prefill_launch(GpuConfig(), (2048, 32, 128), pages, bf16, 64, "10.0") == "triton"
    assert prefill_launch(GpuConfig(), (2048, 32, 128), pages, jnp.float32, 64, "9.0") == "triton"
    assert prefill_launch(GpuConfig(prefill_launch="triton"), (2048, 32, 128), pages, bf16, 64, "9.0") == "triton"
    assert prefill_launch(GpuConfig(prefill_launch="mosaic"), (256, 32, 128), pages, bf16, 256, None) == "mosaic"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads,head_dim,page_size", [((32, 8), 128, 16), ((9, 3), 64, 16), ((8, 2), 128, 32)])
def test_compiled_on_gpu(case, heads, head_dim, page_size):
    assert jax.default_backend() == "gpu"
    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(0)
    b = make_batch(rng, q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                   page_size=page_size, max_pages=-(-max(kv_lens) // page_size) + 1, pad_seqs=2, pad_tokens=5)
    b.q, b.k_pages, b.v_pages = (x.astype(ml_dtypes.bfloat16) for x in (b.q, b.k_pages, b.v_pages))
    want = attention_oracle(type(b)(**{**b.__dict__, **{n: getattr(b, n).astype(np.float32)
                                                         for n in ("q", "k_pages", "v_pages")}}), head_dim ** -0.5)
    out = np.asarray(prefill_attention_mosaic(*b.args(), sm_scale=head_dim ** -0.5), np.float32)
    rows = np.concatenate([np.arange(b.cu_q_lens[s], b.cu_q_lens[s + 1]) for s in range(len(q_lens)) if q_lens[s] > 1])
    np.testing.assert_allclose(out[rows], want[rows], atol=2e-2, rtol=0)
