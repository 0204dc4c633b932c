"""Fused projections, as vLLM's QKVParallelLinear and MergedColumnParallelLinear: each layer's q/k/v kernels become
one `qkv_proj` and its gate/up kernels one `gate_up_proj`, so that a step runs one matmul where it ran three or two.

On an H100, one decoder layer's projections of Llama-3.2-1B at 256 rows took 87 us fused against 108 us separate
(no difference at 8,192 rows; benchmarks/RESULTS.md). The fused kernel holds the parts side by side per
tensor-parallel device, [hidden, tp, (q + k + v) / tp] flattened, so that its column split (`PARAM_RULES`) gives
each device its own heads of q, k and v (and its own columns of gate and up), and the model splits the product
without communication (`llama._projections`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxpaged.models.loaded import LoadedModel
from jaxpaged.models.sharding import AXIS, fitted_spec

_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(model: LoadedModel, release: bool = False) -> LoadedModel:
    """`model` with fused projection kernels (and biases), laid out for its mesh; the values of every product are
    those of the separate kernels. The fused arrays are new: until `model` is dropped, the projections are held
    twice, unless `release`, which deletes each separate array once its fused one is made (the peak is then the
    weights and one group of projections; `model` cannot be used afterwards)."""
    if model.fused:
        return model
    tp = 1 if model.mesh is None else model.mesh.shape[AXIS]
    layers = {}
    for name, layer in model.params["model"].items():
        if name.startswith("layers_"):
            layer = dict(layer)
            for block, fused, parts in _GROUPS:
                sub = dict(layer[block])
                separate = [sub.pop(p) for p in parts]
                sub[fused] = {leaf: _side_by_side(tp, model.mesh, f"model/{name}/{block}/{fused}/{leaf}",
                                                  *[s[leaf] for s in separate]) for leaf in separate[0]}
                if release:
                    for array in (a for s in separate for a in s.values()):
                        array.delete()
                layer[block] = sub
        layers[name] = layer
    params = {**model.params, "model": layers}
    return dataclasses.replace(model, params=params, fused=True)


def _side_by_side(tp: int, mesh, path: str, *arrays: jax.Array) -> jax.Array:
    """[..., n_i] arrays -> [..., sum n_i]: per device block, each array's n_i / tp columns in turn."""
    width = sum(a.shape[-1] for a in arrays)
    shape = (*arrays[0].shape[:-1], width)
    sharding = None if mesh is None else NamedSharding(mesh, fitted_spec(path, shape, mesh))
    return _concat(tp, sharding)(*arrays)


@functools.cache
def _concat(tp: int, sharding):
    def concat(*arrays):
        lead = arrays[0].shape[:-1]
        blocks = [a.reshape(*lead, tp, a.shape[-1] // tp) for a in arrays]
        return jnp.concatenate(blocks, axis=-1).reshape(*lead, -1)
    return jax.jit(concat, out_shardings=sharding)
