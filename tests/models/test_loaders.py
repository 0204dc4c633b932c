"""Loaders: GGUF dequantisation and Q/K un-permutation, the GGUF tokenizer, dummy configs, clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from jaxpaged.models import SHIPPED_CONFIGS, ModelConfig, load_model
from jaxpaged.models.gguf_loader import permute_rows, unpermute_rows
from jaxpaged.models.loader import shipped_config
from jaxpaged.models.weights import param_shapes
from tests.models.paged import greedy

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TINY = os.path.join(FIXTURES, "llama31_gqa_tied_rope_scaling")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 8), 8), w)
    assert not np.array_equal(permute_rows(w, 8), w)


def write_gguf(path: str, folder: str, qtype) -> dict:
    """Writes the tiny safetensors checkpoint as a llama GGUF (Q/K permuted as llama.cpp does)."""
    import gguf

    from jaxpaged.models.safetensors_loader import read_safetensors

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg["vocab_size"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {}
    for name, array in read_safetensors(os.path.join(folder, "model.safetensors")):
        array = np.array(array, np.float32)
        tensors[name] = array
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            key = rest.rsplit(".", 1)[0]
            if key == "self_attn.q_proj":
                array = permute_rows(array, cfg["num_attention_heads"])
            elif key == "self_attn.k_proj":
                array = permute_rows(array, cfg["num_key_value_heads"])
            gname = f"blk.{i}.{parts[key]}.weight"
        else:
            gname = names[name]
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("qtype,atol", [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 2e-2)])
def test_gguf_weights_equal_checkpoint_within_quantisation_error(tmp_path, qtype, atol):
    import gguf

    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, TINY, getattr(gguf.GGMLQuantizationType, qtype))
    ours = load_model(path, dtype="float32")
    ref = load_model(TINY, dtype="float32")
    assert ours.config.num_key_value_heads == 2 and ours.config.tie_word_embeddings
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol * 4 if atol else 0, rtol=0.05 if atol else 0)


def test_gguf_tokenizer_matches_transformers_token_ids(smollm2_tokenizer):
    with open(os.path.join(FIXTURES, "smollm2_greedy.json")) as f:
        cases = json.load(f)["cases"]
    for case in cases:
        ids = smollm2_tokenizer.encode(case["prompt"], add_special_tokens=not case["chat"])
        assert ids == case["prompt_token_ids"]


def test_embedded_model_greedy_matches_transformers_through_model_forward():
    with open(os.path.join(FIXTURES, "smollm2_greedy.json")) as f:
        cases = json.load(f)["cases"]
    model = load_model(None, dtype="float32")
    assert {c["chat"] for c in cases} == {True, False}
    out = greedy(model, [c["prompt_token_ids"] for c in cases], len(cases[0]["hf_token_ids"]))
    assert out == [c["hf_token_ids"] for c in cases]


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_have_expected_shapes_without_materialising(name):
    cfg = ModelConfig.from_hf(shipped_config(name))
    shapes = param_shapes(cfg, np.float32)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    expected = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9}[name]
    assert abs(total - expected) / expected < 0.01
    assert cfg.rope_type == "llama3"


def test_dummy_weights_are_deterministic_per_seed():
    a = load_model(TINY, load_format="dummy", dtype="float32", seed=1)
    b = load_model(TINY, load_format="dummy", dtype="float32", seed=1)
    c = load_model(TINY, load_format="dummy", dtype="float32", seed=2)
    la, lb, lc = (jax.tree.leaves(m.params) for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not all(np.array_equal(x, y) for x, y in zip(la, lc))


def test_missing_and_broken_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="broken.gguf: not a readable GGUF"):
        load_model(str(broken))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(TINY, "config.json")).read())
    (folder / "model.safetensors").write_bytes(open(os.path.join(TINY, "model.safetensors"), "rb").read()[:5000])
    with pytest.raises(ValueError, match="model.safetensors: .*(truncated|not a readable)"):
        load_model(str(folder))
