import numpy as np
import pytest

from jaxpaged.kernels import PAD_SLOT, ragged_paged_attention, write_kv_pages
from tests.kernels.oracle import attention_oracle, make_batch


@pytest.mark.parametrize(
    "q_lens,kv_lens,page_size,heads",
    [
        ([1, 1, 1], [5, 17, 40], 8, (4, 2)),          # decode only, GQA 2
        ([7, 1, 20], [7, 33, 50], 16, (6, 2)),        # fresh prefill + decode + chunk on a cached prefix
        ([64], [64], 16, (3, 1)),                     # one long prefill, MQA
        ([3, 1], [9, 1], 4, (2, 2)),                  # MHA, first token of a sequence
    ],
)
def test_reference_matches_dense_oracle(q_lens, kv_lens, page_size, heads):
    rng = np.random.default_rng(0)
    b = make_batch(rng, q_lens, kv_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
                   page_size=page_size, max_pages=8, pad_seqs=2, pad_tokens=5)
    live = int(b.cu_q_lens[b.num_seqs[0]])
    out = np.asarray(ragged_paged_attention(*b.args(), sm_scale=0.25, impl="reference"))
    np.testing.assert_allclose(out[:live], attention_oracle(b, 0.25)[:live], atol=2e-5, rtol=2e-5)


def test_write_kv_pages_puts_each_token_in_its_slot():
    k_pages = np.zeros((3, 4, 1, 2), np.float32)
    k = np.arange(6, dtype=np.float32).reshape(3, 1, 2)
    slots = np.array([5, 6, 11], np.int32)  # page 1 offsets 1, 2; page 2 offset 3
    new_k, new_v = write_kv_pages(k_pages, k_pages, k, -k, slots)
    new_k, new_v = np.asarray(new_k), np.asarray(new_v)
    np.testing.assert_array_equal(new_k[1, 1, 0], [0, 1])
    np.testing.assert_array_equal(new_k[1, 2, 0], [2, 3])
    np.testing.assert_array_equal(new_k[2, 3, 0], [4, 5])
    np.testing.assert_array_equal(new_v[2, 3, 0], [-4, -5])
    assert np.count_nonzero(new_k) == 5  # value 0 at slot 5 is the only zero written


def test_write_kv_pages_drops_padding_tokens():
    k_pages = np.full((2, 4, 1, 2), 7, np.float32)
    k = np.arange(8, dtype=np.float32).reshape(4, 1, 2)
    slots = np.array([PAD_SLOT, 6, PAD_SLOT, PAD_SLOT], np.int32)
    new_k, _ = write_kv_pages(k_pages, k_pages, k, k, slots)
    want = k_pages.copy()
    want[1, 2, 0] = [2, 3]
    np.testing.assert_array_equal(np.asarray(new_k), want)  # no wrap-around into the last slot, page 0 untouched


def test_auto_keeps_reference_for_head_dims_the_gpu_kernel_does_not_take(monkeypatch):
    import jax

    from jaxpaged.kernels import resolve_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto", 128) == "gpu"
    assert resolve_impl("auto", 48) == "reference"
    assert resolve_impl("gpu", 48) == "gpu"  # explicit choices are kept
