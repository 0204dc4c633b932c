"""CPU timing of one layer's ragged paged attention: the pure-JAX reference vs the blocked "xla" implementation.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/cpu_attention.py [--block-q 32,64] [--block-pages 4,8]

Shapes of the embedded model (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64, page size 16, float32 on CPU),
padded to the engine's CPU buckets (tokens 16..256, sequences 8 or 16) with a page table 32 pages wide
(max_model_len 512). Each call is jitted, warmed up, then timed `--reps` times; the table shows median ms and,
in brackets, the fastest call (the steadier figure on a shared machine).
"""

import argparse
import functools
import itertools
import statistics
import time

import jax
import numpy as np

from jaxpaged.kernels.reference import ragged_paged_attention_reference
from jaxpaged.kernels.xla_blocked import ragged_paged_attention_xla
from tests.kernels.oracle import make_batch

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, MAX_PAGES = 9, 3, 64, 16, 32
CASES = {  # name: (q_lens, kv_lens, token bucket, sequence bucket)
    "prefill 256 @ kv 256": ([256], [256], 256, 8),
    "decode 16 @ kv 300": ([1] * 16, [300] * 16, 16, 16),
    "mix 200 chunk + 15 decode": ([200] + [1] * 15, [200] + [300] * 15, 256, 16),
}


def time_ms(fn, args, reps: int) -> str:
    """Median (fastest) wall time of `fn(*args)` in ms after two warm-up calls (the first compiles)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return f"{1e3 * statistics.median(times):.2f} ({1e3 * min(times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-q", default="", help="comma-separated block_q values to time (default: the default)")
    parser.add_argument("--block-pages", default="", help="comma-separated block_pages values (default: the default)")
    parser.add_argument("--reps", type=int, default=20)
    a = parser.parse_args()
    impls = {"reference": ragged_paged_attention_reference}
    sweep = [[int(x) for x in arg.split(",") if x] or [None] for arg in (a.block_q, a.block_pages)]
    for bq, bp in itertools.product(*sweep):
        kw = {k: v for k, v in (("block_q", bq), ("block_pages", bp)) if v}
        impls[" ".join(["xla"] + [f"{k}={v}" for k, v in kw.items()])] = functools.partial(ragged_paged_attention_xla,
                                                                                            **kw)
    print(f"| one layer, ms | {' | '.join(impls)} |\n|---|{'---|' * len(impls)}")
    for name, (q_lens, kv_lens, tokens, seqs) in CASES.items():
        b = make_batch(np.random.default_rng(0), q_lens, kv_lens, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       head_dim=HEAD_DIM, page_size=PAGE_SIZE, max_pages=MAX_PAGES, pad_seqs=seqs - len(q_lens),
                       pad_tokens=tokens - sum(q_lens))
        args = [jax.device_put(x) for x in b.args()]
        times = [time_ms(jax.jit(functools.partial(f, sm_scale=HEAD_DIM ** -0.5)), args, a.reps)
                 for f in impls.values()]
        print(f"| {name} | {' | '.join(times)} |", flush=True)


if __name__ == "__main__":
    main()
