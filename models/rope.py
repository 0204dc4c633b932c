"""Rotary position embeddings with Llama 3.1 (`rope_type: llama3`) and linear scaling, as HF computes them."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies after scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(cfg.rope_scaling or ())
    if cfg.rope_type == "linear":
        inv = inv / scaling["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    if cfg.rope_freq_factors is not None:  # llama.cpp (GGUF rope_freqs): theta / factor
        inv = inv / np.asarray(cfg.rope_freq_factors, np.float64)
    return inv.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim // 2] float32 for int32 positions [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_frequencies(cfg))[None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [T, heads, head_dim] (HF's rotate_half layout: first half pairs with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
