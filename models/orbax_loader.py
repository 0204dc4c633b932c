"""Orbax checkpoints of a LoadedModel: `<dir>/params` (orbax, the params pytree) + `<dir>/jaxpaged.json`.

orbax-checkpoint is an optional dependency, imported only here.
"""

import json
import os

import jax
import jax.numpy as jnp

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.loaded import LoadedModel
from jaxpaged.models.sharding import loading_shardings
from jaxpaged.models.weights import param_shapes

MANIFEST = "jaxpaged.json"


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError("load_format='orbax' needs orbax-checkpoint: pip install orbax-checkpoint") from None
    return ocp


def save_orbax(model: LoadedModel, path: str) -> None:
    """Writes `model` (params in its dtype, config, tokenizer and generation info) to a new directory `path`."""
    ocp = _orbax()
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), model.params)
    manifest = {"config": model.config.to_hf(), "dtype": jnp.dtype(model.dtype).name,
                "tokenizer_path": model.tokenizer_path, "tokenizer_kwargs": model.tokenizer_kwargs,
                "generation_config": model.generation_config, "name": model.name}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def load_orbax(path: str, dtype: str, overrides: dict | None = None, mesh=None) -> LoadedModel:
    """Restores a directory written by `save_orbax`; dtype "auto" keeps the saved dtype, else casts on restore."""
    from jaxpaged.models.loader import resolve_dtype
    from jaxpaged.models.safetensors_loader import read_json

    ocp = _orbax()
    path = os.path.abspath(path)
    manifest = read_json(os.path.join(path, MANIFEST), "an orbax checkpoint written by jaxpaged (save_orbax)")
    cfg = ModelConfig.from_hf({**manifest["config"], **(overrides or {})})
    jdtype = resolve_dtype(manifest["dtype"] if dtype == "auto" else dtype, None)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: not found; expected the orbax params of a jaxpaged checkpoint")
    target = param_shapes(cfg, jdtype)
    if mesh is not None:  # restored straight into the shardings: each device reads its slices
        target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              target, loading_shardings(cfg, mesh, target))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"{params_dir}: cannot restore the params of this config ({e})") from None
    return LoadedModel(cfg, params, jdtype, manifest["tokenizer_path"], manifest["tokenizer_kwargs"],
                       manifest["generation_config"], manifest["name"])
