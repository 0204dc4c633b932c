"""Flax Llama family decoder (Llama 2/3/3.1/3.2, Qwen2-style q/k/v bias) over a paged KV pool.

One call runs a flat ragged batch: T new tokens of several sequences; every layer writes its new K/V into the pages
(`write_kv_pages`) and then attends through `ragged_paged_attention`. Norms, softmax and rotary run in float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpaged.kernels import ragged_paged_attention, write_kv_pages
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.metadata import AttentionMetadata
from jaxpaged.models.rope import apply_rope, rope_cos_sin

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (k_pages, v_pages) [num_pages, page_size, kv_heads, head_dim]


class RMSNorm(nn.Module):
    """x [..., hidden] normalised in float32, cast back to `dtype`, then scaled (HF LlamaRMSNorm order)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * x32.astype(self.dtype)


def _precision(dtype):
    """float32 models get true float32 matmuls: JAX's default on GPU (TF32) and TPU (bf16 passes) would break the
    float32 parity with HF. Other dtypes keep the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dense(features: int, name: str, dtype, bias: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, precision=_precision(dtype), name=name)


def _projections(x, widths: tuple[int, ...], names: tuple[str, ...], fused: str | None, mesh, dtype,
                 bias: bool = False) -> list[jax.Array]:
    """x [T, hidden] through the projections `names` of output widths `widths`: one matmul each, or with `fused`
    one matmul through the kernel `fused` that holds them side by side per tensor-parallel device
    ([hidden, tp, sum(widths) / tp], `models/fusion.py`). Returns [T, width] per projection, columns in the
    order of the separate kernels."""
    if fused is None:
        return [_dense(w, n, dtype, bias)(x) for w, n in zip(widths, names)]
    tp = 1 if mesh is None else mesh.shape[mesh.axis_names[0]]
    out = _dense(sum(widths), fused, dtype, bias)(x)  # [T, sum(widths)]
    parts = jnp.split(out.reshape(x.shape[0], tp, -1), np.cumsum([w // tp for w in widths])[:-1], axis=-1)
    return [p.reshape(x.shape[0], -1) for p in parts]  # [T, width] each


class Attention(nn.Module):
    """x [T, hidden] -> [T, hidden]: q/k/v projections (one fused matmul with `fused`), rotary, KV write into the
    pages, paged attention, o_proj.

    Returns the layer's updated (k_pages, v_pages).
    """

    cfg: ModelConfig
    dtype: jnp.dtype
    attn_impl: str
    mesh: Any = None
    fused: bool = False

    @nn.compact
    def __call__(self, x, md: AttentionMetadata, kv: tuple[jax.Array, jax.Array], cos, sin):
        c, t = self.cfg, x.shape[0]
        q, k, v = _projections(x, (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                                   c.num_key_value_heads * c.head_dim), ("q_proj", "k_proj", "v_proj"),
                               "qkv_proj" if self.fused else None, self.mesh, self.dtype, c.attention_bias)
        q = apply_rope(q.reshape(t, c.num_attention_heads, c.head_dim), cos, sin)  # [T, H, D]
        k = apply_rope(k.reshape(t, c.num_key_value_heads, c.head_dim), cos, sin)  # [T, KVH, D]
        v = v.reshape(t, c.num_key_value_heads, c.head_dim)
        out, k_pages, v_pages = _paged_attention(self.mesh, self.attn_impl, c.head_dim ** -0.5, q, k, v, *kv, md)
        out = _dense(c.hidden_size, "o_proj", self.dtype)(out.reshape(t, -1))
        return out, (k_pages, v_pages)


def _paged_attention(mesh, impl: str, sm_scale: float, q, k, v, k_pages, v_pages, md: AttentionMetadata):
    """Writes the new K/V into the pages and attends: q [T, H, D], k / v [T, KVH, D] -> out [T, H, D] and the
    pages. With a mesh, each device runs both on its own heads and its share of the pool (heads split over the
    mesh axis, metadata replicated): no communication inside attention."""
    def attend(q, k, v, k_pages, v_pages, md):
        k_pages, v_pages = write_kv_pages(k_pages, v_pages, k, v, md.slot_mapping)
        out = ragged_paged_attention(q, k_pages, v_pages, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
                                     sm_scale=sm_scale, impl=impl, decode_only=md.decode_only)
        return out, k_pages, v_pages

    if mesh is None:
        return attend(q, k, v, k_pages, v_pages, md)
    heads, pool = P(None, mesh.axis_names[0], None), P(None, None, mesh.axis_names[0], None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, pool, pool, P()),
                         out_specs=(heads, pool, pool), check_vma=False)(q, k, v, k_pages, v_pages, md)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), x [T, hidden]; gate and up one fused matmul with `fused`."""

    cfg: ModelConfig
    dtype: jnp.dtype
    mesh: Any = None
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate, up = _projections(x, (c.intermediate_size,) * 2, ("gate_proj", "up_proj"),
                                "gate_up_proj" if self.fused else None, self.mesh, self.dtype)
        return _dense(c.hidden_size, "down_proj", self.dtype)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    cfg: ModelConfig
    dtype: jnp.dtype
    attn_impl: str
    mesh: Any = None
    fused: bool = False

    @nn.compact
    def __call__(self, x, md, kv, cos, sin):
        c = self.cfg
        with jax.named_scope("attention"):
            h, kv = Attention(c, self.dtype, self.attn_impl, self.mesh, self.fused, name="self_attn")(
                RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), md, kv, cos, sin)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + MLP(c, self.dtype, self.mesh, self.fused, name="mlp")(
                RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return x, kv


@functools.cache
def _layer_fn(cfg: ModelConfig, dtype, attn_impl: str, mesh, fused: bool):
    """(layer params, x, md, kv, cos, sin) -> (x, kv): one decoder layer as a jitted function. Every layer of a
    step program calls it with the same shapes, so JAX traces and lowers it once per program, not once per layer
    (the Pallas kernels' lowering included); XLA inlines the calls, so the compiled program is the same."""
    layer = DecoderLayer(cfg, dtype, attn_impl, mesh, fused)
    return jax.jit(lambda params, x, md, kv, cos, sin: layer.apply({"params": params}, x, md, kv, cos, sin))


class LlamaModel(nn.Module):
    """token ids [T] -> final hidden states [T, hidden] (after the last norm) and the updated KV pool."""

    cfg: ModelConfig
    dtype: jnp.dtype
    attn_impl: str = "auto"
    mesh: Any = None  # tensor-parallel mesh: attention per device on its heads (models/sharding.py)
    fused: bool = False  # params with qkv_proj and gate_up_proj (models/fusion.py) instead of the separate kernels

    @nn.compact
    def __call__(self, token_ids: jax.Array, md: AttentionMetadata, kv_caches: KVCache):
        c = self.cfg
        if len(kv_caches) != c.num_hidden_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model {c.num_hidden_layers}")
        with jax.named_scope("embed"):
            x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         name="embed_tokens")(token_ids)  # [T, hidden]
            cos, sin = rope_cos_sin(c, md.positions)  # [T, head_dim // 2] f32 each
        new_caches = []
        for i, kv in enumerate(kv_caches):
            name = f"layers_{i}"
            if self.is_initializing():
                x, kv = DecoderLayer(c, self.dtype, self.attn_impl, self.mesh, self.fused, name=name)(
                    x, md, kv, cos, sin)
            else:  # one traced and lowered layer called num_hidden_layers times (see `_layer_fn`)
                x, kv = _layer_fn(c, self.dtype, self.attn_impl, self.mesh, self.fused)(
                    self.variables["params"][name], x, md, kv, cos, sin)
            new_caches.append(kv)
        with jax.named_scope("final_norm"):
            x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)  # [T, hidden]
        return x, new_caches


def compute_logits(cfg: ModelConfig, params, hidden: jax.Array) -> jax.Array:
    """[N, hidden] -> [N, vocab] float32 through the LM head (the embedding when tied).

    params: {"model": LlamaModel params, "lm_head": {"kernel": [hidden, vocab]} (empty when tied)}.
    """
    with jax.named_scope("lm_head"):
        if cfg.tie_word_embeddings:
            weight = params["model"]["embed_tokens"]["embedding"].T  # [hidden, vocab]
        else:
            weight = params["lm_head"]["kernel"]  # [hidden, vocab]
        return jnp.dot(hidden, weight, precision=_precision(weight.dtype), preferred_element_type=jnp.float32)
