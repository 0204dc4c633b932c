"""Random weights of the right shapes (`load_format="dummy"`), for benchmarks and tests."""

import jax
import jax.numpy as jnp

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.sharding import placer
from jaxpaged.models.weights import param_shapes


def dummy_params(cfg: ModelConfig, dtype, seed: int, mesh=None) -> dict:
    """Normal(0, 0.02) matrices and ones for norm weights, generated on device leaf by leaf, same per seed (and
    for any tensor-parallel `mesh`, each leaf placed into its sharding as soon as it is made)."""
    place = placer(cfg, dtype, mesh)
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.key(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        keys = tuple(k.key for k in path)
        if keys[-1] == "weight":  # RMSNorm
            out.append(place(keys, jnp.ones(leaf.shape, dtype)))
        else:
            out.append(place(keys, _normal(jax.random.fold_in(key, i), leaf.shape, dtype)))
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit(static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
