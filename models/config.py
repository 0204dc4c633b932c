"""ModelConfig: the Llama-family fields of a HF `config.json`, validated and hashable (a jit-static value)."""

import dataclasses
import logging

logger = logging.getLogger(__name__)

ROPE_TYPES = ("default", "llama3", "linear")
_ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",), "default": ()}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama / Llama 3.x / Qwen2-style decoder config (HF `LlamaConfig` names).

    `rope_scaling` is kept as a sorted tuple of (key, value) pairs so the config stays hashable.
    `rope_freq_factors` ([head_dim // 2] divisors of the inverse frequencies) is how llama.cpp stores Llama 3.1
    rope scaling in GGUF files (the `rope_freqs.weight` tensor); HF configs leave it None.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str | None = None
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model config: num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model config: rope_scaling type {self.rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        missing = [k for k in _ROPE_KEYS[self.rope_type] if k not in dict(self.rope_scaling or ())]
        if missing:
            raise ValueError(f"model config: rope_scaling of type {self.rope_type!r} lacks {', '.join(missing)}")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"model config: rope_freq_factors has {len(self.rope_freq_factors)} entries, expected "
                             f"head_dim // 2 = {self.head_dim // 2}")

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default")) or "default"

    @property
    def qkv_width(self) -> int:
        """Output width of a layer's q, k and v projections together (the fused `qkv_proj`)."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def to_hf(self) -> dict:
        """A HF-style config dict that `from_hf` maps back to this config (orbax checkpoints store it)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return d

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Builds a config from a HF config dict (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM...)."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"model config is missing {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"model config: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("model config: mlp_bias=True is not supported")
        if d.get("use_sliding_window") or (d.get("sliding_window") and not d.get("model_type") == "qwen2"):
            logger.warning("model config: sliding_window=%s is ignored; attention is full (exact only for contexts "
                           "up to the window)", d.get("sliding_window"))
        heads = d["num_attention_heads"]
        scaling = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        if scaling is not None:
            scaling = tuple(sorted((k, v) for k, v in scaling.items() if k != "rope_theta"))
            if dict(scaling).get("rope_type", dict(scaling).get("type")) in (None, "default"):
                scaling = None
        is_qwen2 = "Qwen2ForCausalLM" in (d.get("architectures") or []) or d.get("model_type") == "qwen2"
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", is_qwen2)),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            rope_freq_factors=tuple(d["rope_freq_factors"]) if d.get("rope_freq_factors") is not None else None,
        )
