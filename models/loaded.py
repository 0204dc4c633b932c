"""LoadedModel: a config, its weights and the pure functions the engine jits."""

import dataclasses
from typing import Any

import jax

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.llama import KVCache, LlamaModel, compute_logits
from jaxpaged.models.metadata import AttentionMetadata


@dataclasses.dataclass
class LoadedModel:
    """Weights plus what the engine needs around them.

    `params` is {"model": Flax params of LlamaModel, "lm_head": {"kernel": [hidden, vocab]} or {}} in `dtype`.
    `tokenizer_path` / `tokenizer_kwargs` are what `jaxpaged.tokenizer.load_tokenizer` takes (None: no tokenizer,
    e.g. a shape-only dummy config). `mesh`: the tensor-parallel mesh the weights are sharded over
    (`jaxpaged.models.sharding.shard_model`), None on one device. `fused`: the params hold each layer's q/k/v and
    gate/up kernels fused (`jaxpaged.models.fusion.fuse_projections`), not in the checkpoint's layout.
    """

    config: ModelConfig
    params: Any
    dtype: Any
    tokenizer_path: str | None
    tokenizer_kwargs: dict
    generation_config: dict
    name: str
    mesh: Any = None
    fused: bool = False

    def forward(self, params, token_ids: jax.Array, md: AttentionMetadata, kv_caches: KVCache, *,
                attn_impl: str = "auto") -> tuple[jax.Array, KVCache]:
        """token_ids [T] -> hidden [T, hidden] and the KV pool with this step's K/V written. Pure; jit-able."""
        module = LlamaModel(self.config, self.dtype, attn_impl, self.mesh, self.fused)
        return module.apply({"params": params["model"]}, token_ids, md, kv_caches)

    def compute_logits(self, params, hidden: jax.Array) -> jax.Array:
        """[N, hidden] -> [N, vocab] float32."""
        return compute_logits(self.config, params, hidden)
