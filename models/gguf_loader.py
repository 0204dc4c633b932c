"""GGUF files (llama.cpp) through the `gguf` package: config from metadata, dequantised weights, Q/K un-permuted."""

import os

import numpy as np

from jaxpaged.models.config import ModelConfig

_ARCHS = ("llama", "qwen2")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def open_gguf(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def gguf_config(reader, path: str) -> tuple[ModelConfig, dict]:
    """ModelConfig and generation config (eos/bos ids) from GGUF metadata."""
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    d = {
        "vocab_size": field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens", [])),
        "hidden_size": hidden, "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": field(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "model_type": arch,
    }
    generation = {k: field(f"tokenizer.ggml.{g}") for k, g in (("eos_token_id", "eos_token_id"),
                                                               ("bos_token_id", "bos_token_id"))}
    return ModelConfig.from_hf(d), {k: v for k, v in generation.items() if v is not None}


def gguf_tensors(reader, cfg: ModelConfig, arch: str):
    """Yields (HF name, float32 array [out, in]) for every tensor, dequantised and with Q/K rows un-permuted."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else t.name
        else:
            name = _TOP_NAMES.get(t.name, t.name)
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        array = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if arch == "llama" and rest_is(t.name, "attn_q"):
            array = unpermute_rows(array, cfg.num_attention_heads)
        elif arch == "llama" and rest_is(t.name, "attn_k"):
            array = unpermute_rows(array, cfg.num_key_value_heads)
        yield name, array


def rest_is(name: str, kind: str) -> bool:
    return name.startswith("blk.") and name.split(".")[2] == kind


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which interleaves the two rotary halves of each head's rows."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF layout -> GGUF layout); the inverse of `unpermute_rows`."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(reader) -> str:
    return reader.fields["general.architecture"].contents()


def split_gguf_path(path: str) -> tuple[str, str]:
    folder, name = os.path.split(os.path.abspath(path))
    return folder, name
