"""GGUF loading: dequantisation of each block type, llama.cpp's Q/K row permutation undone, config from metadata
(Llama 3.1 rope_freqs included), Qwen2 biases, the embedded model's tokenizer and greedy parity."""

import json
import math
import os

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from jaxpaged.models import load_model
from jaxpaged.models.gguf_loader import gguf_tensors, open_gguf, permute_rows, unpermute_rows
from jaxpaged.models.safetensors_loader import read_safetensors
from tests.models.paged import PagedSequence, greedy

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
LLAMA31 = os.path.join(FIXTURES, "llama31_gqa_tied_rope_scaling")
QWEN2 = os.path.join(FIXTURES, "qwen2_bias_gqa")
_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def llama_cpp_rope_freqs(cfg: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for a Llama 3.1 config (its own formula)."""
    rope = cfg["rope_parameters"]
    base, dim = rope["rope_theta"], cfg["head_dim"]
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, np.float32)


def write_gguf(path: str, folder: str, qtype: Q) -> dict[str, np.ndarray]:
    """Writes a tiny HF checkpoint as llama.cpp would (Q/K rows permuted for llama, rope_freqs for Llama 3.1).

    Returns the HF-named float32 weights each loaded tensor must equal: the matrices after a quantise/dequantise
    round trip in HF row order (quantisation blocks run along rows, so the permutation commutes with it).
    """
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg["rope_parameters"]["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(cfg))
    expected = {}
    for name, array in read_safetensors(os.path.join(folder, "model.safetensors")):
        array = np.array(array, np.float32)
        quantised = array.ndim == 2 and qtype != Q.F32
        expected[name] = dequantize(quantize(array, qtype), qtype).reshape(array.shape) if quantised else array
        if name in _TOP:
            gname = _TOP[name]
        else:
            _, _, i, rest = name.split(".", 3)
            key, leaf = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_PARTS[key]}.{leaf}"
            if arch == "llama" and key in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg["num_attention_heads" if key == "self_attn.q_proj" else "num_key_value_heads"]
                array = permute_rows(array, heads)
        if quantised:
            w.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 8), 8), w)
    assert not np.array_equal(permute_rows(w, 8), w)
    b = np.arange(4 * 16, dtype=np.float32)  # a q bias is permuted the same way
    np.testing.assert_array_equal(unpermute_rows(permute_rows(b, 4), 4), b)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_weights_equal_dequantised_checkpoint_in_hf_layout(tmp_path, qtype):
    path = str(tmp_path / "tiny.gguf")
    expected = write_gguf(path, LLAMA31, qtype)
    reader = open_gguf(path)
    model = load_model(path, dtype="float32")
    got = dict(gguf_tensors(reader, model.config))
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def write_one_tensor(tmp_path, raw: np.ndarray, qtype: Q) -> str:
    path = str(tmp_path / f"{qtype.name}.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_dequantise_to_the_logical_shape(tmp_path, qtype):
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block_elems
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block_elems * block_bytes), dtype=np.uint8)
    # fp16 super-block scales (Q4_K: d, dmin first; Q6_K: d last) set to 1.0 so every value is finite
    scales = [0, 2] if qtype == Q.Q4_K else [block_bytes - 2]
    for b in range(cols // block_elems):
        for at in scales:
            raw[:, b * block_bytes + at: b * block_bytes + at + 2] = [0x00, 0x3C]
    [(name, array)] = list(gguf_tensors(open_gguf(write_one_tensor(tmp_path, raw, qtype)), None))
    assert name == "model.embed_tokens.weight" and array.shape == (rows, cols) and array.dtype == np.float32
    np.testing.assert_array_equal(array, dequantize(raw, qtype).reshape(rows, cols))
    assert np.isfinite(array).all()


def test_block_type_gguf_cannot_dequantise_is_named(tmp_path):
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
    path = write_one_tensor(tmp_path, np.zeros((2, block_bytes), np.uint8), Q.Q8_1)
    with pytest.raises(ValueError, match="Q8_1.gguf: tensor 'token_embd.weight' is Q8_1, a type the gguf package"):
        list(gguf_tensors(open_gguf(path), None, path))


@pytest.mark.parametrize("folder", [LLAMA31, QWEN2], ids=os.path.basename)
def test_f32_gguf_logits_match_hf(tmp_path, folder):
    """Llama 3.1 (rope_freqs instead of rope_scaling, permuted Q/K) and Qwen2 (biases, no permutation)."""
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, folder, Q.F32)
    model = load_model(path, dtype="float32")
    with open(os.path.join(folder, "tokens.json")) as f:
        tokens = json.load(f)
    hf = np.load(os.path.join(folder, "hf_logits.npy"))
    assert model.config.tie_word_embeddings == (folder == LLAMA31)
    assert model.config.attention_bias == (folder == QWEN2)
    assert (model.config.rope_freq_factors is not None) == (folder == LLAMA31)
    assert np.abs(PagedSequence(model, len(tokens)).feed(tokens) - hf).max() < 1e-4


def test_gguf_tokenizer_matches_transformers_token_ids(smollm2_tokenizer):
    with open(os.path.join(FIXTURES, "smollm2_greedy.json")) as f:
        cases = json.load(f)["cases"]
    for case in cases:
        ids = smollm2_tokenizer.encode(case["prompt"], add_special_tokens=not case["chat"])
        assert ids == case["prompt_token_ids"]


def test_gguf_tokenizer_special_tokens_follow_the_file_ids(smollm2_tokenizer):
    # the GGUF names bos 1 and eos 2; transformers 5.17's converter hands them over swapped
    assert (smollm2_tokenizer.bos_token, smollm2_tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (smollm2_tokenizer.eos_token, smollm2_tokenizer.eos_token_id) == ("<|im_end|>", 2)


def test_embedded_model_greedy_matches_transformers_through_model_forward():
    with open(os.path.join(FIXTURES, "smollm2_greedy.json")) as f:
        cases = json.load(f)["cases"]
    model = load_model(None, dtype="float32")
    assert model.name == "SmolLM2-135M-Instruct" and model.tokenizer_kwargs["gguf_file"].endswith(".gguf")
    assert model.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert {c["chat"] for c in cases} == {True, False}
    out = greedy(model, [c["prompt_token_ids"] for c in cases], len(cases[0]["hf_token_ids"]))
    assert out == [c["hf_token_ids"] for c in cases]
    assert jax.tree.leaves(model.params)[0].dtype == np.float32


def test_live_embedded_model_greedy_matches_transformers():
    """Recomputes HF's greedy tokens for a prompt outside the fixture (runs only where torch is installed)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_model(None, dtype="float32")
    tok = AutoTokenizer.from_pretrained(model.tokenizer_path, **model.tokenizer_kwargs)
    hf = AutoModelForCausalLM.from_pretrained(model.tokenizer_path, dtype=torch.float32,
                                              **model.tokenizer_kwargs).eval()
    ids = tok.encode("Gravity is a force that")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert greedy(model, [ids], 8) == [out]
