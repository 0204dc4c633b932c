"""ModelConfig: the Llama-family fields of a HF `config.json`, validated and hashable (a jit-static value)."""

import dataclasses

ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama / Llama 3.x / Qwen2-style decoder config (HF `LlamaConfig` names).

    `rope_scaling` is kept as a sorted tuple of (key, value) pairs so the config stays hashable.
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

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default")) or "default"

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Builds a config from a HF config dict (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM...)."""
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"model config is missing {', '.join(missing)}")
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
        )
