"""One decoder layer's projections (q/k/v, o, gate/up, SwiGLU, down) of Llama-3.2-1B and Llama-3.1-8B shapes, bf16,
with q/k/v and gate/up as separate matmuls vs fused ones (`models/fusion.py`), at decode (256) and prefill (8,192)
rows. Prints one JSON line per case: microseconds per call (50 jitted calls) and TFLOP/s.

    python benchmarks/projection_fusion.py
"""
import json
import time

import jax
import jax.numpy as jnp


SHAPES = {"1b": (2048, 8192, 32, 8, 64), "8b": (4096, 14336, 32, 8, 128)}  # hidden, intermediate, heads, kv, dim


def layer_fn(inter: int, nq: int, hd: int, fused: bool):
    """x [M, hidden] -> (x after the layer's projections and SwiGLU, k|v [M, 2 kv dim])."""
    def separate(x, w):
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        h = x + q @ w["o"]
        return h + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["d"], jnp.concatenate([k, v], 1)

    def fused_fn(x, w):
        qkv = x @ w["qkv"]
        h = x + qkv[:, :nq * hd] @ w["o"]
        gu = h @ w["gu"]
        return h + (jax.nn.silu(gu[:, :inter]) * gu[:, inter:]) @ w["d"], qkv[:, nq * hd:]
    return jax.jit(fused_fn if fused else separate)


def weights(hidden: int, inter: int, nq: int, nkv: int, hd: int, fused: bool) -> dict:
    key = jax.random.PRNGKey(0)

    def w(*shape):
        return jax.random.normal(key, shape, jnp.bfloat16) * 0.02
    if fused:
        return dict(qkv=w(hidden, (nq + 2 * nkv) * hd), o=w(nq * hd, hidden), gu=w(hidden, 2 * inter),
                    d=w(inter, hidden))
    return dict(q=w(hidden, nq * hd), k=w(hidden, nkv * hd), v=w(hidden, nkv * hd), o=w(nq * hd, hidden),
                g=w(hidden, inter), u=w(hidden, inter), d=w(inter, hidden))


def run(name: str, rows: int, fused: bool, calls: int = 50) -> dict:
    hidden, inter, nq, nkv, hd = SHAPES[name]
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, hidden), jnp.bfloat16)
    w, f = weights(hidden, inter, nq, nkv, hd, fused), layer_fn(inter, nq, hd, fused)
    for _ in range(4):
        jax.block_until_ready(f(x, w))
    start = time.perf_counter()
    for _ in range(calls):
        out = f(x, w)
    jax.block_until_ready(out)
    us = (time.perf_counter() - start) / calls * 1e6
    flops = 2 * rows * (hidden * (nq + 2 * nkv) * hd + nq * hd * hidden + 3 * hidden * inter)
    return dict(model=name, m=rows, fused=fused, us=round(us, 1), tflops=round(flops / us / 1e6, 1))


if __name__ == "__main__":
    for model in SHAPES:
        for m in (256, 8192):
            for fused in (False, True):
                print(json.dumps(run(model, m, fused)), flush=True)
