"""One call of our kernel (and of cuDNN, for prefill) per shape, for a kernel profiler (ncu) to read launch by launch.

    ncu --kernel-name regex:rpa_ --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        python3 benchmarks/profile_kernels.py decode
    ncu --kernel-name regex:"rpa_|cudnn|sm90" --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/profile_kernels.py prefill
"""

import sys

import jax

from benchmarks.kernel_bench import make_batch, ours

DECODE = [(16, 1024, 32, 8, 128), (256, 1024, 32, 8, 128), (16, 1024, 9, 3, 64)]  # B, L, heads, kv heads, dim


def run(fn, *args):
    for _ in range(2):  # compile, then the profiled call
        jax.block_until_ready(fn(*args))


def decode():
    for bsz, L, h, kvh, d in DECODE:
        b = make_batch([1] * bsz, [L] * bsz, h, kvh, d)
        run(jax.jit(ours(sm_scale=d ** -0.5)), b.q, b.tables[0], b.k_pages, b.v_pages, b.kv_lens, b.cu, b.num_seqs)
        print(f"decode B={bsz} L={L} {h}/{kvh}x{d}: K/V bytes {2 * bsz * L * kvh * d * 2}", flush=True)


def prefill(T=8192, h=32, kvh=8, d=128):
    b = make_batch([T], [T], h, kvh, d)
    run(jax.jit(ours(sm_scale=d ** -0.5)), b.q, b.tables[0], b.k_pages, b.v_pages, b.kv_lens, b.cu, b.num_seqs)
    k = b.k_pages[b.tables[0, 0]].reshape(1, T, kvh, d)
    v = b.v_pages[b.tables[0, 0]].reshape(1, T, kvh, d)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[None], k, v, scale=d ** -0.5, is_causal=True,
                                                                 implementation="cudnn"))
    run(cudnn, b.q, k, v)
    print(f"prefill T={T} {h}/{kvh}x{d}", flush=True)


if __name__ == "__main__":
    {"decode": decode, "prefill": prefill}[sys.argv[1] if len(sys.argv) > 1 else "decode"]()
