"""fuse_projections: one q/k/v and one gate/up kernel per layer, laid out per tensor-parallel device; the model's
logits are those of the separate kernels."""

import os

import numpy as np
import pytest

from jaxpaged.models import load_model
from jaxpaged.models.fusion import fuse_projections
from jaxpaged.models.sharding import make_mesh, shard_model
from tests.models.paged import PagedBatch

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 12], [250, 8, 8, 61]]


@pytest.mark.parametrize("fixture", ["qwen2_bias_gqa", "llama31_gqa_tied_rope_scaling"])
def test_fused_logits_equal_the_separate_kernels(fixture):
    model = load_model(os.path.join(FIXTURES, fixture), dtype="float32")
    fused = fuse_projections(model)
    attn = fused.params["model"]["layers_0"]["self_attn"]
    assert fused.fused and sorted(attn) == ["o_proj", "qkv_proj"]
    assert sorted(fused.params["model"]["layers_0"]["mlp"]) == ["down_proj", "gate_up_proj"]
    assert sorted(attn["qkv_proj"]) == (["bias", "kernel"] if model.config.attention_bias else ["kernel"])
    outs = [PagedBatch(m, [len(p) + 2 for p in PROMPTS]).step(PROMPTS) for m in (model, fused)]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert fuse_projections(fused) is fused


def test_each_device_holds_its_own_heads_of_q_k_and_v():
    model = load_model(os.path.join(FIXTURES, "qwen2_bias_gqa"), dtype="float32")
    cfg, layer = model.config, model.params["model"]["layers_0"]
    sharded = fuse_projections(shard_model(model, make_mesh(2)))
    kernel = sharded.params["model"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
    q, k, v = (np.asarray(layer["self_attn"][p]["kernel"]) for p in ("q_proj", "k_proj", "v_proj"))
    nq, nkv = cfg.num_attention_heads * cfg.head_dim // 2, cfg.num_key_value_heads * cfg.head_dim // 2
    shards = sorted(kernel.addressable_shards, key=lambda s: s.index[1].start)
    for d, shard in enumerate(shards):
        want = np.concatenate([q[:, d * nq:(d + 1) * nq], k[:, d * nkv:(d + 1) * nkv], v[:, d * nkv:(d + 1) * nkv]], 1)
        np.testing.assert_array_equal(np.asarray(shard.data), want)


def test_release_deletes_the_separate_kernels_and_keeps_the_logits():
    model = load_model(os.path.join(FIXTURES, "qwen2_bias_gqa"), dtype="float32")
    before = PagedBatch(model, [len(p) + 2 for p in PROMPTS]).step(PROMPTS)
    layer = model.params["model"]["layers_0"]
    separate = [layer[block][part][leaf] for block, part in (("self_attn", "q_proj"), ("self_attn", "v_proj"),
                                                              ("mlp", "up_proj")) for leaf in layer[block][part]]
    fused = fuse_projections(model, release=True)
    assert all(a.is_deleted() for a in separate)
    assert not layer["self_attn"]["o_proj"]["kernel"].is_deleted()  # shared with the fused model
    after = PagedBatch(fused, [len(p) + 2 for p in PROMPTS]).step(PROMPTS)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
