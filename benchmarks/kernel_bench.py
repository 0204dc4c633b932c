"""Kernel micro-benchmarks on one GPU: ragged paged attention vs copy bandwidth, JAX's shipped paged kernel, cuDNN.

    python3 benchmarks/kernel_bench.py [--quick] [--part decode,prefill,fused] [--sweep decode,prefill] [--out r.jsonl]

Every kernel is first checked against the pure-JAX reference on the benchmark inputs (compiled, on the GPU), then
timed by `time_us`: chained calls in one jitted loop, page tables rotating over disjoint page sets so that K/V come
from HBM, not L2 (cuDNN is also timed with the calls unrolled: it runs faster so). Ratios compare figures of the
same run only.
"""

import argparse
import dataclasses
import functools
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.kernels import ragged_paged_attention_reference, write_kv_pages
from jaxpaged.kernels.gpu_split import (GpuConfig, decode_splits, ragged_paged_attention_gpu,
                                       ragged_paged_attention_gpu_fused)
from jaxpaged.kernels.ops import slot_mapping

warnings.filterwarnings("ignore", category=DeprecationWarning)


def chained(fn, reps, num_sets, unroll=False):
    """jit of `reps` dependent calls x = fn(x, tables[i % num_sets], *fixed): an output is the next query.

    A fori_loop with a static trip count: one kernel instance to compile, and XLA runs a loop of known trip count
    without reading its condition back to the host. `unroll=True` emits the calls one after another instead.
    """

    def many(x, tables, *fixed):
        return jax.lax.fori_loop(0, reps, lambda i, x: fn(x, tables[i % num_sets], *fixed), x, unroll=unroll)

    return jax.jit(many)


def time_us(fn, x, tables, fixed=(), reps=(10, 60), runs=5, unroll=False):
    """Device microseconds per call of fn(x, table, *fixed).

    Each call's query is the previous call's output, so no call is merged or dropped; page tables rotate over
    `tables` [num_sets, ...], disjoint pages of one pool, so that repeated calls do not read their K/V from L2.
    Per-call time is the slope between `reps[0]` and `reps[1]` chained calls (fastest of `runs` each: host
    jitter only adds time), which cancels the host's dispatch of the jitted function.
    """
    best = []
    for r in reps:
        f = chained(fn, r, tables.shape[0], unroll)
        jax.block_until_ready(f(x, tables, *fixed))  # compile + warm up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            jax.block_until_ready(f(x, tables, *fixed))
            times.append(time.perf_counter() - t)
        best.append(min(times))
    return (best[1] - best[0]) / (reps[1] - reps[0]) * 1e6


def copy_bandwidth(gib=4):
    """Bytes read + written per second of a device-to-device elementwise copy of a large bf16 array."""
    x = jax.random.normal(jax.random.key(0), (gib * 2**29,), jnp.bfloat16)
    # -a: exact in bf16 (a * 1.001 rounds to a * 1 and folds away); the barrier keeps XLA from fusing the chain
    us = time_us(lambda a, _: jax.lax.optimization_barrier(-a), x, jnp.zeros((1,)))
    return 2 * x.nbytes / (us * 1e-6)


@dataclasses.dataclass
class Batch:
    q: jax.Array         # [T, H, D]
    k_pages: jax.Array   # [num_pages, page_size, KVH, D]
    v_pages: jax.Array
    kv_lens: jax.Array   # [S]
    tables: jax.Array    # [num_sets, S, max_pages]: disjoint page sets of the same batch
    cu: jax.Array        # [S + 1]
    num_seqs: jax.Array  # [1]

    def args(self, i=0):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.tables[i], self.cu, self.num_seqs)


def make_batch(q_lens, kv_lens, heads, kv_heads, head_dim, page_size=16, dtype=jnp.bfloat16, num_sets=1, seed=0):
    """Random pool holding `num_sets` disjoint copies of the batch's pages (shuffled), page 0 the null page."""
    rng = np.random.default_rng(seed)
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + num_sets * sum(pages)
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    tables = np.zeros((num_sets, len(q_lens), max(pages)), np.int32)
    at = 0
    for i in range(num_sets):
        for s, n in enumerate(pages):
            tables[i, s, :n] = perm[at:at + n]
            at += n
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    k = jax.random.split(jax.random.key(seed), 3)
    shape = (num_pages, page_size, kv_heads, head_dim)
    return Batch(jax.random.normal(k[0], (int(cu[-1]), heads, head_dim), dtype),
                 jax.random.normal(k[1], shape, dtype), jax.random.normal(k[2], shape, dtype),
                 jnp.asarray(kv_lens, jnp.int32), jnp.asarray(tables), jnp.asarray(cu),
                 jnp.asarray([len(q_lens)], jnp.int32))


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def ours(config=GpuConfig(), sm_scale=1.0):
    """fn(q, table, k_pages, v_pages, kv_lens, cu, num_seqs) of our kernel."""

    def fn(q, table, k_pages, v_pages, kv_lens, cu, num_seqs):
        return ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, table, cu, num_seqs, sm_scale=sm_scale,
                                          config=config)

    return fn


def ours_fixed(b: Batch):
    return (b.k_pages, b.v_pages, b.kv_lens, b.cu, b.num_seqs)


def shipped_decode(sm_scale, ppcb, k_splits):
    """fn(q, table, k_pages, v_pages, lengths) of JAX's shipped Triton paged attention (head-major pool)."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pa

    def fn(q, table, k_pages, v_pages, lengths):
        # the shipped kernel takes no scale: q is pre-scaled inside the timed function, as an engine would
        return pa.paged_attention(q * sm_scale, k_pages, v_pages, table, lengths, pages_per_compute_block=ppcb,
                                  k_splits=k_splits)

    return fn


def head_major(b: Batch):
    """The shipped kernel's pool layout [KVH, num_pages, page_size, D], transposed once, untimed."""
    kp, vp = (jnp.transpose(x, (2, 0, 1, 3)) for x in (b.k_pages, b.v_pages))
    return (kp, vp, b.kv_lens)


def num_sets(nbytes):
    """Page sets to rotate so that one pass over them (>= 256 MB) does not fit in the 50 MB L2."""
    return int(min(8, max(1, -(-256e6 // nbytes))))


def decode_rows(args, quick):
    batches = args.batches or ([16, 256] if quick else [16, 64, 256])
    lengths = args.lengths or ([1024, 8192] if quick else [512, 1024, 4096, 8192])
    for (h, kvh, d) in args.shapes:
        for bsz in batches:
            for L in lengths:
                yield from decode_case(bsz, L, h, kvh, d, args)


def check_and_time(row, name, fn, b, ref, fixed, unroll=False):
    """Checks fn on set 0 against `ref`, then times it (only if it is right)."""
    err = rel_err(jax.jit(fn)(b.q, b.tables[0], *fixed), ref)
    row[f"{name}_err"] = err
    row[f"{name}_us"] = time_us(fn, b.q, b.tables, fixed, unroll=unroll) if err < 2e-2 else None
    return row[f"{name}_us"]


def reference(b: Batch, sm_scale):
    return jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale))(*b.args())


DECODE_SWEEP = {  # name: config of ours timed with --sweep decode
    "ours_splits1": GpuConfig(decode_splits=1),
    "ours_mb8": GpuConfig(min_blocks_per_split=8),
    "ours_st4": GpuConfig(decode_stages=4),
    "ours_mosaic": GpuConfig(prefill_launch="mosaic"),  # the cost of its empty prefill programs on decode
}
PREFILL_SWEEP = {  # tiles of the Triton prefill launch
    name: GpuConfig(prefill_launch="triton", **kw) for name, kw in {
        "ours_st3": dict(prefill_stages=3),
        "ours_w8": dict(prefill_warps=8),
        "ours_w8_st3": dict(prefill_warps=8, prefill_stages=3),
        "ours_bk128_w8": dict(prefill_block_k=128, prefill_warps=8),
        "ours_r64": dict(prefill_rows=64),
        "ours_r64_st3": dict(prefill_rows=64, prefill_stages=3),
        "ours_r64_bk128": dict(prefill_rows=64, prefill_block_k=128),
        "ours_bk32": dict(prefill_block_k=32),
        "ours_r256_w8": dict(prefill_rows=256, prefill_warps=8),
    }.items()
}


def decode_case(bsz, L, h, kvh, d, args):
    kv_bytes = 2 * bsz * L * kvh * d * 2
    b = make_batch([1] * bsz, [L] * bsz, h, kvh, d, num_sets=num_sets(kv_bytes))
    scale = d ** -0.5
    ref = reference(b, scale)
    row = dict(part="decode", B=bsz, L=L, heads=f"{h}/{kvh}x{d}", kv_bytes=kv_bytes, sets=int(b.tables.shape[0]))
    variants = {"ours": GpuConfig(), **(DECODE_SWEEP if "decode" in args.sweep else {})}
    for name, cfg in variants.items():
        check_and_time(row, name, ours(cfg, scale), b, ref, ours_fixed(b))
    best = None
    pages = L // 16
    configs = args.shipped.get((bsz, L, row["heads"]), [(8, 1), (8, 4), (16, 1), (16, 16)])  # winners of a sweep
    for ppcb, ks in configs:
        if pages % ks or (pages // ks) % min(ppcb, pages // ks):
            continue
        us = check_and_time({}, "x", shipped_decode(scale, ppcb, ks), b, ref, head_major(b))
        if us is not None and (best is None or us < best[0]):
            best = (us, ppcb, ks)
    if best:
        row.update(shipped_us=best[0], shipped_cfg=f"ppcb={best[1]},k_splits={best[2]}")
    row["splits"] = decode_splits(GpuConfig(), bsz, kvh, L, d)
    yield row


def prefill_rows(args):
    for T in ([8192] if args.quick else [2048, 8192]):
        yield from prefill_case(T, 32, 8, 128, "prefill", [T], [T], args)
        # mixed: four prefill chunks of T/4 on cached prefixes of 1k, plus 64 decodes at 2k context
        q_lens = [T // 4] * 4 + [1] * 64
        kv_lens = [T // 4 + 1024] * 4 + [2048] * 64
        yield from prefill_case(T, 32, 8, 128, "mixed", q_lens, kv_lens, args)


def prefill_case(T, h, kvh, d, kind, q_lens, kv_lens, args):
    b = make_batch(q_lens, kv_lens, h, kvh, d)
    scale = d ** -0.5
    flops = sum(4 * h * d * (q * (n - q) + q * (q + 1) / 2) for q, n in zip(q_lens, kv_lens))
    ref = reference(b, scale)
    row = dict(part=kind, T=int(b.q.shape[0]), heads=f"{h}/{kvh}x{d}", flops=flops)
    variants = {"ours": GpuConfig(), "ours_triton": GpuConfig(prefill_launch="triton"),
                **(PREFILL_SWEEP if "prefill" in args.sweep else {})}
    for name, cfg in variants.items():
        check_and_time(row, name, ours(cfg, scale), b, ref, ours_fixed(b))
    if kind == "prefill":  # cuDNN flash attention on the same tokens, K/V dense
        n = kv_lens[0]
        kd = b.k_pages[b.tables[0, 0]].reshape(1, -1, kvh, d)[:, :n]
        vd = b.v_pages[b.tables[0, 0]].reshape(1, -1, kvh, d)[:, :n]

        def cudnn(q, table, k, v):
            del table
            return jax.nn.dot_product_attention(q[None], k, v, scale=scale, is_causal=True,
                                                implementation="cudnn")[0]

        check_and_time(row, "cudnn", cudnn, b, ref, (kd, vd))
        check_and_time(row, "cudnn_unrolled", cudnn, b, ref, (kd, vd), unroll=True)
    yield row


def fused_rows(args):
    """The engine's two ways to add a step's K/V: scatter then attention, or the fused kernel."""
    cases = [("decode", [1] * 64, [1024] * 64), ("decode", [1] * 256, [4096] * 256),
             ("mixed", [512] * 4 + [1] * 64, [1536] * 4 + [2048] * 64),
             ("prefill", [2048], [2048]), ("prefill", [8192], [8192])]  # fused: new keys read in token order
    for kind, q_lens, kv_lens in cases:
        b = make_batch(q_lens, kv_lens, 32, 8, 128)
        scale = 128 ** -0.5
        t = b.q.shape[0]
        k = jax.random.split(jax.random.key(1), 2)
        kn, vn = (jax.random.normal(x, (t, 8, 128), jnp.bfloat16) for x in k)
        meta = (b.kv_lens, b.tables[0], b.cu, b.num_seqs)
        slots = slot_mapping(16, *meta, t)

        def scatter(carry, _, kn, vn, *meta, slots=slots, scale=scale):
            q, kp, vp = carry
            kp, vp = write_kv_pages(kp, vp, kn, vn, slots)
            return ragged_paged_attention_gpu(q, kp, vp, *meta, sm_scale=scale), kp, vp

        def fused(carry, _, kn, vn, *meta, scale=scale):
            return ragged_paged_attention_gpu_fused(carry[0], kn, vn, *carry[1:], *meta, sm_scale=scale)

        row = dict(part="fused", kind=kind, B=len(q_lens), T=t, L=max(kv_lens))
        x = (b.q, b.k_pages, b.v_pages)
        for name, fn in (("scatter_then_attention", scatter), ("fused", fused)):
            row[f"{name}_us"] = time_us(fn, x, jnp.zeros((1,)), (kn, vn, *meta))
        yield row


def table(rows, copy_bw):
    lines = [f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s (read + write)", ""]
    for r in rows:
        us = {k[:-3]: v for k, v in r.items() if k.endswith("_us") and v}
        if r["part"] == "decode":
            cells = [f"{k} {v:.1f}us {r['kv_bytes'] / (v * 1e-6) / copy_bw:.0%}" for k, v in us.items()]
            lines.append(f"decode B={r['B']:<3} L={r['L']:<5} {r['heads']:<9} splits={r['splits']:<2} | "
                         + " | ".join(cells) + f" | shipped cfg {r.get('shipped_cfg')}")
        elif r["part"] == "fused":
            cells = [f"{k} {v:.1f}us" for k, v in us.items()]
            lines.append(f"fused   {r['kind']:<6} B={r['B']:<3} T={r['T']:<5} L={r['L']:<5} | " + " | ".join(cells))
        else:
            cells = [f"{k} {v:.0f}us {r['flops'] / (v * 1e-6) / 1e12:.0f}TF/s" for k, v in us.items()]
            lines.append(f"{r['part']:<7} T={r['T']:<5} {r['heads']} | " + " | ".join(cells))
        errs = {k[:-4]: v for k, v in r.items() if k.endswith("_err") and not v < 2e-2}
        if errs:
            lines.append(f"   WRONG (rel err >= 2e-2): {errs}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--sweep", default="", help="parts (decode,prefill) where other tile configs of ours are timed")
    p.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None)
    p.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=None)
    p.add_argument("--shapes", type=lambda v: [tuple(int(x) for x in s.split("/")) for s in v.split(",")],
                   default=[(32, 8, 128), (9, 3, 64)], help="decode shapes heads/kv_heads/head_dim, e.g. 32/8/128")
    p.add_argument("--shipped-from", default=None,
                   help="JSON lines of an earlier run: time the shipped kernel only in the config that won there")
    p.add_argument("--part", default="decode,prefill,fused", help="comma-separated: decode, prefill, fused")
    p.add_argument("--out", default=None, help="JSON lines, one per case")
    args = p.parse_args()
    args.shipped = {}
    for line in open(args.shipped_from) if args.shipped_from else []:
        r = json.loads(line)
        if r.get("shipped_cfg"):
            cfg = dict(kv.split("=") for kv in r["shipped_cfg"].split(","))
            args.shipped[(r["B"], r["L"], r["heads"])] = [(int(cfg["ppcb"]), int(cfg["k_splits"]))]
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    bw = copy_bandwidth()
    print(json.dumps(dict(part="copy", bytes_per_s=bw)), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(dict(part="copy", bytes_per_s=bw)) + "\n")
    rows = []
    parts = args.part.split(",")
    gens = {"decode": lambda: decode_rows(args, args.quick), "prefill": lambda: prefill_rows(args),
            "fused": lambda: fused_rows(args)}
    gens = [gens[part]() for part in parts]
    for gen in gens:
        for row in gen:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows, bw))


if __name__ == "__main__":
    main()
