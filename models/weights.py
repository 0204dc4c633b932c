"""HF tensor names -> LoadedModel params, and the expected parameter shapes of a config."""

import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.sharding import placer

_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORM = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def param_shapes(cfg: ModelConfig, dtype) -> dict:
    """The params pytree of `cfg` as ShapeDtypeStructs (nothing is materialised).

    NOTE: spelled out rather than traced through `LlamaModel.init` (a second per load on 30 layers); the test
    `test_param_shapes_match_flax_init` keeps the two equal.
    """
    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size

    def dense(d_in, d_out, bias=False):
        return {"kernel": leaf(d_in, d_out), **({"bias": leaf(d_out)} if bias else {})}

    layer = {
        "input_layernorm": {"weight": leaf(h)}, "post_attention_layernorm": {"weight": leaf(h)},
        "self_attn": {"q_proj": dense(h, q, cfg.attention_bias), "k_proj": dense(h, kv, cfg.attention_bias),
                      "v_proj": dense(h, kv, cfg.attention_bias), "o_proj": dense(q, h)},
        "mlp": {"gate_proj": dense(h, inter), "up_proj": dense(h, inter), "down_proj": dense(inter, h)},
    }
    model = {"embed_tokens": {"embedding": leaf(cfg.vocab_size, h)}, "norm": {"weight": leaf(h)},
             **{f"layers_{i}": layer for i in range(cfg.num_hidden_layers)}}
    return {"model": model, "lm_head": {} if cfg.tie_word_embeddings else {"kernel": leaf(h, cfg.vocab_size)}}


def _path(name: str) -> tuple[tuple[str, ...], bool]:
    """Our params path of a HF tensor name, and whether the array must be transposed ([out, in] -> [in, out])."""
    if name == "model.embed_tokens.weight":
        return ("model", "embed_tokens", "embedding"), False
    if name == "model.norm.weight":
        return ("model", "norm", "weight"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    if m := _NORM.match(name):
        return ("model", f"layers_{m[1]}", m[2], "weight"), False
    if m := _LAYER.match(name):
        leaf = "kernel" if m[4] == "weight" else "bias"
        return ("model", f"layers_{m[1]}", m[2], m[3], leaf), leaf == "kernel"
    raise KeyError(name)


def build_params(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype, source: str,
                 mesh=None) -> dict:
    """Places HF-named numpy tensors into the params pytree (cast to `dtype`), checking names and shapes; with a
    tensor-parallel `mesh`, each straight into its sharding (`sharding.placer`)."""
    place = placer(cfg, dtype, mesh)
    expected = param_shapes(cfg, dtype)
    params: dict = {"model": {}, "lm_head": {}}
    for name, array in tensors:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        try:
            path, transpose = _path(name)
        except KeyError:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a Llama-family model") from None
        want = _lookup(expected, path)
        want_shape = None if want is None else tuple(want.shape)[::-1] if transpose else tuple(want.shape)
        if tuple(array.shape) != want_shape:  # HF layout in the message: [out, in]
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {want_shape} "
                             "for this config")
        array = array.T if transpose else array
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = place(path, array)
    paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    missing = [".".join(p) for p in paths if _lookup(params, p) is None]
    if missing:
        raise ValueError(f"{source}: missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return params


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree
