"""Kernel micro-benchmarks on a GPU: decode bandwidth and prefill TFLOP/s of ragged paged attention.

    python benchmarks/kernels.py [--quick]

Baselines measured in the same run: device-to-device copy bandwidth; JAX's shipped
`jax.experimental.pallas.ops.gpu.paged_attention` (decode only, tuned over pages_per_compute_block and k_splits);
`jax.nn.dot_product_attention(..., implementation="cudnn")` for causal prefill. Every timed output is first
checked against the pure-JAX reference on the same device.
"""

import argparse
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.kernels import ragged_paged_attention

PAGE = 16


def timeit(fn, *args, iters: int = 20) -> float:
    """Median seconds of `fn(*args)` after two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 0)
    return 2 * x.nbytes / timeit(copy, x)


def decode_inputs(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, key):
    pages_per_seq = length // PAGE
    num_pages = batch * pages_per_seq + 1
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (batch, heads, head_dim), jnp.bfloat16)
    k_pages = jax.random.normal(k2, (num_pages, PAGE, kv_heads, head_dim), jnp.bfloat16)
    v_pages = jax.random.normal(k3, (num_pages, PAGE, kv_heads, head_dim), jnp.bfloat16)
    table = (1 + np.random.default_rng(0).permutation(batch * pages_per_seq)).reshape(batch, pages_per_seq)
    return (q, k_pages, v_pages, jnp.full((batch,), length, jnp.int32), jnp.asarray(table, jnp.int32),
            jnp.arange(batch + 1, dtype=jnp.int32), jnp.array([batch], jnp.int32))


def shipped_decode(args, head_dim):
    """Best time of JAX's shipped paged_attention over its tuning knobs (layout converted outside the timing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    q, k_pages, v_pages, lens, table, _, _ = args
    kp, vp = k_pages.transpose(2, 0, 1, 3), v_pages.transpose(2, 0, 1, 3)  # [KVH, pages, page, D]
    best = (float("inf"), None)
    pages_per_seq = table.shape[1]
    for ppcb in (4, 8, 16):
        for splits in (1, 4, 8, 16):
            if pages_per_seq % splits or (pages_per_seq // splits) % min(ppcb, pages_per_seq // splits):
                continue
            fn = jax.jit(lambda q, kp, vp, t, l, ppcb=ppcb, splits=splits: paged_attention(
                q, kp, vp, t, l, pages_per_compute_block=ppcb, k_splits=splits))
            try:
                best = min(best, (timeit(fn, q, kp, vp, table, lens), f"ppcb={ppcb},k_splits={splits}"))
            except Exception as e:  # some shapes exceed its shared-memory or block limits
                print(f"  shipped kernel ppcb={ppcb} k_splits={splits}: {type(e).__name__}")
    return best


def run_decode(bw: float, quick: bool) -> list[dict]:
    rows = []
    shapes = [(32, 8, 128), (9, 3, 64)]
    batches = (16, 64, 256) if not quick else (64,)
    lengths = (512, 1024, 4096, 8192) if not quick else (1024,)
    for heads, kv_heads, head_dim in shapes:
        for batch in batches:
            for length in lengths:
                args = decode_inputs(batch, length, heads, kv_heads, head_dim, jax.random.key(0))
                scale = head_dim ** -0.5
                ours = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=scale, impl="gpu"))
                ref = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=scale, impl="reference"))
                err = float(jnp.abs(ours(*args).astype(jnp.float32) - ref(*args).astype(jnp.float32)).max())
                t = timeit(ours, *args)
                kv_bytes = 2 * batch * length * kv_heads * head_dim * 2
                t_ship, cfg = shipped_decode(args, head_dim)
                rows.append({"kind": "decode", "heads": f"{heads}/{kv_heads}x{head_dim}", "batch": batch,
                             "len": length, "us": t * 1e6, "pct_copy_bw": 100 * kv_bytes / t / bw,
                             "shipped_us": t_ship * 1e6, "shipped_pct_copy_bw": 100 * kv_bytes / t_ship / bw,
                             "shipped_cfg": cfg, "max_abs_err": err})
                print(json.dumps(rows[-1]), flush=True)
                del args
    return rows


def run_prefill(quick: bool) -> list[dict]:
    rows = []
    heads, kv_heads, head_dim = 32, 8, 128
    for tokens in ((2048,) if quick else (2048, 8192)):
        key = jax.random.key(1)
        q = jax.random.normal(key, (tokens, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (tokens, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (tokens, kv_heads, head_dim), jnp.bfloat16)
        pages = tokens // PAGE
        k_pages = jnp.concatenate([jnp.zeros((1, PAGE, kv_heads, head_dim), k.dtype),
                                   k.reshape(pages, PAGE, kv_heads, head_dim)])
        v_pages = jnp.concatenate([jnp.zeros((1, PAGE, kv_heads, head_dim), v.dtype),
                                   v.reshape(pages, PAGE, kv_heads, head_dim)])
        meta = (jnp.array([tokens], jnp.int32), jnp.arange(1, pages + 1, dtype=jnp.int32)[None],
                jnp.array([0, tokens], jnp.int32), jnp.array([1], jnp.int32))
        scale = head_dim ** -0.5
        ours = jax.jit(lambda q, kp, vp: ragged_paged_attention(q, kp, vp, *meta, sm_scale=scale, impl="gpu"))
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                     scale=scale, implementation="cudnn")[0])
        err = float(jnp.abs(ours(q, k_pages, v_pages).astype(jnp.float32)
                            - cudnn(q, k, v).astype(jnp.float32)).max())
        flops = 4 * tokens * tokens * heads * head_dim / 2  # causal
        t_ours, t_cudnn = timeit(ours, q, k_pages, v_pages, iters=10), timeit(cudnn, q, k, v, iters=10)
        rows.append({"kind": "prefill", "heads": f"{heads}/{kv_heads}x{head_dim}", "tokens": tokens,
                     "tflops": flops / t_ours / 1e12, "cudnn_tflops": flops / t_cudnn / 1e12,
                     "ratio_vs_cudnn": t_cudnn / t_ours, "max_abs_err_vs_cudnn": err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args()
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    bw = copy_bandwidth()
    print(json.dumps({"copy_bandwidth_TBps": bw / 1e12}), flush=True)
    rows = run_prefill(args.quick)
    if not args.skip_decode:
        rows += run_decode(bw, args.quick)
    print("\n| kind | heads | shape | ours | baseline | ours/baseline |")
    for r in rows:
        if r["kind"] == "decode":
            print(f"| decode | {r['heads']} | B={r['batch']} L={r['len']} | {r['us']:.0f} us "
                  f"({r['pct_copy_bw']:.0f}% copy bw) | shipped {r['shipped_us']:.0f} us "
                  f"({r['shipped_pct_copy_bw']:.0f}%, {r['shipped_cfg']}) | {r['shipped_us'] / r['us']:.2f}x |")
        else:
            print(f"| prefill | {r['heads']} | T={r['tokens']} | {r['tflops']:.0f} TFLOP/s | cuDNN "
                  f"{r['cudnn_tflops']:.0f} TFLOP/s | {r['ratio_vs_cudnn']:.2f}x |")


if __name__ == "__main__":
    main()
