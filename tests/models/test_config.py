"""ModelConfig.from_hf: HF v4 and v5 config layouts, hashability, validation errors that name the field."""

import numpy as np
import pytest

from jaxpaged.models import ModelConfig
from jaxpaged.models.loader import shipped_config
from jaxpaged.models.rope import inv_frequencies

BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_v4_rope_scaling_and_v5_rope_parameters_give_the_same_config():
    v4 = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert v4 == v5 and hash(v4) == hash(v5)
    assert v4.rope_type == "llama3" and v4.rope_theta == 500000.0 and v4.head_dim == 16


def test_default_rope_type_means_no_scaling_and_qwen2_means_bias():
    cfg = ModelConfig.from_hf({**BASE, "model_type": "qwen2", "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 1e6}})
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6 and cfg.attention_bias
    assert ModelConfig.from_hf({**BASE, "num_key_value_heads": None}).num_key_value_heads == 4  # MHA


def test_to_hf_round_trips():
    for cfg in (ModelConfig.from_hf(shipped_config("llama-3.1-8b")),
                ModelConfig.from_hf({**BASE, "rope_freq_factors": [1.0] * 8})):
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    plain = inv_frequencies(ModelConfig.from_hf({**BASE, "head_dim": 128, "rope_theta": 500000.0}))
    scaled = inv_frequencies(ModelConfig.from_hf({**BASE, "head_dim": 128, "rope_theta": 500000.0,
                                                  "rope_scaling": LLAMA3}))
    np.testing.assert_allclose(scaled[:8], plain[:8])
    np.testing.assert_allclose(scaled[-8:], plain[-8:] / 8.0)


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": None}, "model config is missing vocab_size"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor, high_freq_factor"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
])
def test_invalid_configs_name_the_field(change, message):
    d = {k: v for k, v in {**BASE, **change}.items() if v is not None or k != "vocab_size"}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_param_shapes_match_flax_init(bias, tied):
    import jax
    import jax.numpy as jnp

    from jaxpaged.models import AttentionMetadata
    from jaxpaged.models.llama import LlamaModel
    from jaxpaged.models.weights import param_shapes

    cfg = ModelConfig.from_hf({**BASE, "head_dim": 24, "attention_bias": bias, "tie_word_embeddings": tied})
    kv = [(jax.ShapeDtypeStruct((2, 1, 2, 24), jnp.bfloat16),) * 2] * 2
    md = AttentionMetadata(*(jax.ShapeDtypeStruct(s, jnp.int32) for s in [(1,), (1,), (1,), (1, 1), (2,), (1,)]))
    init = LlamaModel(cfg, jnp.bfloat16, "reference").init
    flax_params = jax.eval_shape(lambda t, m, k: init(jax.random.key(0), t, m, k)["params"],
                                 jax.ShapeDtypeStruct((1,), jnp.int32), md, kv)
    ours = param_shapes(cfg, jnp.bfloat16)
    assert ours["model"] == flax_params
    assert ours["lm_head"] == ({} if tied else {"kernel": jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)})
