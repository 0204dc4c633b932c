"""One call of our kernel per decode shape, for a kernel profiler (ncu) to time launch by launch.

    ncu --kernel-name regex:rpa_ --metrics gpu__time_duration.sum,dram__bytes_read.sum python3 benchmarks/profile_decode.py
"""

import jax

from benchmarks.kernels import make_batch, ours

for bsz, L, h, kvh, d in [(16, 1024, 32, 8, 128), (256, 1024, 32, 8, 128), (16, 1024, 9, 3, 64)]:
    b = make_batch([1] * bsz, [L] * bsz, h, kvh, d)
    fn = jax.jit(ours(sm_scale=d ** -0.5))
    for _ in range(2):  # compile, then the profiled call
        jax.block_until_ready(fn(b.q, b.tables[0], b.k_pages, b.v_pages, b.kv_lens, b.cu, b.num_seqs))
    print(f"B={bsz} L={L} {h}/{kvh}x{d}: K/V bytes {2 * bsz * L * kvh * d * 2}", flush=True)
