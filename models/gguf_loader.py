"""GGUF files (llama.cpp) through the `gguf` package: config from metadata, dequantised weights, Q/K un-permuted.

NOTE: `gguf` is imported inside the functions, so `jaxpaged.models` imports where it is absent (the GPU machine).
"""

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
_SKIP = ("rope_freqs.weight",)  # read into the config (rope_freq_factors)
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def open_gguf(path: str):
    """A GGUFReader (memory-mapped); ValueError naming the path when the file is not GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def gguf_config(reader, path: str, overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """ModelConfig (HF names, `overrides` applied) and generation config (eos/bos ids) from GGUF metadata."""
    raw, generation = gguf_hf_config(reader, path)
    return config_from_hf({**raw, **(overrides or {})}, path), generation


def config_from_hf(raw: dict, path: str) -> ModelConfig:
    """ModelConfig.from_hf, its ValueError naming `path`."""
    try:
        return ModelConfig.from_hf(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def gguf_hf_config(reader, path: str) -> tuple[dict, dict]:
    """The HF-style config dict and the generation config (eos/bos ids) from GGUF metadata."""
    from gguf.quants import dequantize

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = gguf_arch(reader, path)
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    tensors = {t.name: t for t in reader.tensors}
    d = {
        "vocab_size": field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens", [])),
        "hidden_size": hidden, "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(f"{arch}.attention.key_length", hidden // heads if hidden and heads else None),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": field(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "model_type": arch,
    }
    scaling = field(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        d["rope_scaling"] = {"rope_type": scaling, "factor": field(f"{arch}.rope.scaling.factor", 1.0)}
    if "rope_freqs.weight" in tensors:  # Llama 3.1 rope scaling, as llama.cpp stores it
        t = tensors["rope_freqs.weight"]
        d["rope_freq_factors"] = [float(x) for x in dequantize(t.data, t.tensor_type).reshape(-1)]
    d = {k: v for k, v in d.items() if v is not None}
    eos, eot = field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id")
    generation = {"bos_token_id": field("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": [eos, eot] if eot is not None and eos is not None and eot != eos else eos}
    return d, {k: v for k, v in generation.items() if v is not None}


def gguf_tensors(reader, cfg: ModelConfig, path: str = ""):
    """Yields (HF name, float32 array [out, in]) for every weight, dequantised and with Q/K rows un-permuted."""
    from gguf.quants import dequantize

    permuted = gguf_arch(reader, path) == "llama"  # llama.cpp's converter permutes Q/K (weights, biases) of llama
    for t in reader.tensors:
        if t.name in _SKIP:
            continue
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind is not None:
            _, layer, rest = t.name.split(".", 2)
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else t.name
        else:
            name = _TOP_NAMES.get(t.name, t.name)
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        data = t.data.view(np.ndarray)  # a plain view: memmap subclass bookkeeping per block costs seconds
        try:
            array = dequantize(data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}, a type the gguf package cannot "
                             "dequantise") from None
        if permuted and kind == "attn_q":
            array = unpermute_rows(array, cfg.num_attention_heads)
        elif permuted and kind == "attn_k":
            array = unpermute_rows(array, cfg.num_key_value_heads)
        yield name, array


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which interleaves the two rotary halves of each head's rows."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF layout -> GGUF layout); the inverse of `unpermute_rows`."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(reader, path: str) -> str:
    f = reader.fields.get("general.architecture")
    arch = None if f is None else f.contents()
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
    return arch
