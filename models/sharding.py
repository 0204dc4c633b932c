"""Tensor parallelism: a 1-D device mesh (axis "model") and Megatron-style shardings of a Llama model and its pool.

The shardings are declared once, in `PARAM_RULES` (parameter path pattern -> PartitionSpec of the [in, out] Flax
kernel): q/k/v/gate/up column-parallel (fused or not: `fusion.py` lays the fused kernels out per device),
o/down row-parallel, embedding and LM head vocab-parallel, norms replicated. The page pool is split over its
KV-head axis (`POOL_SPEC`), and attention runs under `shard_map` on each device's heads (see `LlamaModel`); GSPMD
inserts the all-reduces after o_proj and down_proj.

When the tensor-parallel size N exceeds the model's KV heads, each KV head is replicated over N / num_kv_heads
devices (vLLM's rule): `shard_model` repeats the k/v projection columns head by head, so that every device holds
exactly one KV head, the one its query heads read (GQA groups stay aligned because query head h sits on device
h // (H / N) and reads KV head h // (H / num_kv_heads)).
"""

import dataclasses
import logging
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.loaded import LoadedModel

logger = logging.getLogger(__name__)

AXIS = "model"
POOL_SPEC = P(None, None, AXIS, None)  # [num_pages, page_size, kv_heads, head_dim]: KV heads split
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"self_attn/(q_proj|k_proj|v_proj|qkv_proj)/kernel$", P(None, AXIS)),
    (r"self_attn/(q_proj|k_proj|v_proj|qkv_proj)/bias$", P(AXIS)),
    (r"self_attn/o_proj/kernel$", P(AXIS, None)),
    (r"mlp/(gate_proj|up_proj|gate_up_proj)/kernel$", P(None, AXIS)),
    (r"mlp/down_proj/kernel$", P(AXIS, None)),
    (r"embed_tokens/embedding$", P(AXIS, None)),  # [vocab, hidden]
    (r"lm_head/kernel$", P(None, AXIS)),  # [hidden, vocab]
    (r"layernorm/weight$|norm/weight$", P()),
)


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A mesh with one axis "model" over the first `tensor_parallel_size` devices of the default backend."""
    devices = jax.devices()
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices, but JAX sees "
                         f"{len(devices)} ({devices[0].platform}); on CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={tensor_parallel_size} makes virtual ones.")
    return Mesh(devices[:tensor_parallel_size], (AXIS,))


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """vLLM's conditions on the head counts and the tensor-parallel size, with its wording."""
    if cfg.num_attention_heads % tp:
        raise ValueError(f"Total number of attention heads ({cfg.num_attention_heads}) must be divisible by tensor "
                         f"parallel size ({tp}).")
    kv = cfg.num_key_value_heads
    if (tp >= kv and tp % kv) or (tp < kv and kv % tp):
        raise ValueError(f"Total number of KV heads ({kv}) and tensor parallel size ({tp}) must divide one another: "
                         "each device holds whole KV heads, or replicas of one.")
    if cfg.intermediate_size % tp:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) must be divisible by tensor parallel size "
                         f"({tp}).")


def kv_heads_per_device(cfg: ModelConfig, tp: int) -> int:
    """KV heads each device holds in the pool (1 when they are replicated)."""
    return max(cfg.num_key_value_heads // tp, 1)


def param_spec(path: str) -> P:
    """The PartitionSpec of the parameter at `path` ("model/layers_0/self_attn/q_proj/kernel")."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return spec
    raise KeyError(f"no sharding rule for parameter {path!r}")


Place = Callable[[tuple[str, ...], object], jax.Array]  # (params path, host or device array) -> placed array


def placer(cfg: ModelConfig, dtype, mesh: Mesh | None) -> Place:
    """How a loader puts each weight on the devices as it is read, one tensor at a time: cast to `dtype`, then on
    the default device, or with a mesh straight into its sharding (each device receives only its slice). With more
    devices than KV heads, k/v projections are placed whole on every device: `shard_model` repeats their heads
    before splitting them."""
    if mesh is None:
        return lambda path, array: jnp.asarray(array, dtype=dtype)
    check_divisible(cfg, mesh.shape[AXIS])

    def place(path: tuple[str, ...], array) -> jax.Array:
        array = np.asarray(array).astype(dtype) if isinstance(array, np.ndarray) else array.astype(dtype)
        return jax.device_put(array, loading_sharding(cfg, mesh, "/".join(path), array.shape))
    return place


def loading_sharding(cfg: ModelConfig, mesh: Mesh, path: str, shape: tuple[int, ...]) -> NamedSharding:
    """Where a checkpoint tensor goes as it is read: its `fitted_spec`, except k/v projections when the mesh exceeds
    the KV heads (whole on every device until `shard_model` repeats their heads)."""
    if mesh.shape[AXIS] > cfg.num_key_value_heads and re.search(r"self_attn/(k_proj|v_proj)/", path):
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, fitted_spec(path, shape, mesh))


def loading_shardings(cfg: ModelConfig, mesh: Mesh, shapes):
    """A pytree like `shapes` (checkpoint-shaped params) of each leaf's `loading_sharding` (an orbax restore target)."""
    check_divisible(cfg, mesh.shape[AXIS])
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: loading_sharding(cfg, mesh, "/".join(k.key for k in path), leaf.shape), shapes)


def fitted_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`param_spec(path)`, or replicated when the mesh does not divide the split dimension (a vocabulary of
    128,256 over 3 devices: the embedding and LM head are then whole on every device)."""
    spec = param_spec(path)
    if any(axis is not None and dim % mesh.shape[axis] for dim, axis in zip(shape, spec)):
        logger.info("%s %s is not divisible over the mesh: replicated.", path, shape)
        return P()
    return spec


def param_shardings(params, mesh: Mesh):
    """A pytree like `params` of NamedShardings from `PARAM_RULES`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, fitted_spec("/".join(k.key for k in path), leaf.shape, mesh)), params)


def shard_model(model: LoadedModel, mesh: Mesh) -> LoadedModel:
    """`model` with its weights in their shardings on `mesh` (KV heads replicated up to the mesh size when it
    exceeds them) and attention run per device; the weights' values are those of `model` for any mesh size.
    Leaves a loader already placed (`load_model(mesh=...)`) stay where they are; others move leaf by leaf."""
    tp = mesh.shape[AXIS]
    cfg = model.config
    check_divisible(cfg, tp)
    params = model.params
    if tp > cfg.num_key_value_heads:
        params = _replicate_kv_heads(params, cfg, tp // cfg.num_key_value_heads)
        cfg = dataclasses.replace(cfg, num_key_value_heads=tp)
    shardings = param_shardings(params, mesh)
    placed = jax.tree.map(jax.device_put, params, shardings)
    return dataclasses.replace(model, config=cfg, params=placed, mesh=mesh)


def _replicate_kv_heads(params: dict, cfg: ModelConfig, replicas: int) -> dict:
    """k_proj / v_proj kernels [hidden, KVH * D] (and biases [KVH * D]) with each head's columns repeated
    `replicas` times in place: [hidden, KVH * replicas * D]."""
    def repeat(x):  # [..., KVH * D]
        lead = x.shape[:-1]
        x = x.reshape(*lead, cfg.num_key_value_heads, cfg.head_dim)
        return jnp.repeat(x, replicas, axis=-2).reshape(*lead, -1)

    layers = {}
    for name, layer in params["model"].items():
        if name.startswith("layers_"):
            attn = dict(layer["self_attn"])
            for proj in ("k_proj", "v_proj"):
                attn[proj] = {k: repeat(v) for k, v in attn[proj].items()}
            layer = {**layer, "self_attn": attn}
        layers[name] = layer
    return {**params, "model": layers}


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    """The sharding of host inputs, page tables and sampled ids: every device holds all of it."""
    return None if mesh is None else NamedSharding(mesh, P())


def pool_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """The page pool's sharding (KV heads split over the mesh)."""
    return None if mesh is None else NamedSharding(mesh, POOL_SPEC)


def log_plan(model: LoadedModel, pool_bytes_per_device: int) -> None:
    """Logs the mesh and the per-device memory plan (weights, KV pool)."""
    mesh = model.mesh
    weights = sum(s.data.nbytes for leaf in jax.tree.leaves(model.params)
                  for s in leaf.addressable_shards if s.device == mesh.devices.flat[0])
    logger.info("Mesh %s over %s; per device: weights %.2f GiB, KV pool %.2f GiB (%d KV heads).",
                dict(mesh.shape), [str(d) for d in mesh.devices.flat], weights / 2**30,
                pool_bytes_per_device / 2**30, kv_heads_per_device(model.config, mesh.shape[AXIS]))
