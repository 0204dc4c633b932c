"""A throughput roofline for an offline workload, from the device's measured matmul peak and copy bandwidth.

Model (the whole workload at the engine's maximum batch, `max_num_seqs` slots):
  * prefill is compute-bound: 2 * layer weights * prompt tokens + 2 * vocab weights * requests (logits of each
    prompt's last token only) + causal attention (4 * layers * heads * head_dim per query-key pair), at the peak;
  * decode runs in steps over the slots: each request takes the first free slot in order (with equal output
    lengths these are waves of `max_num_seqs`) and stays for output_len - 1 steps (its first token comes from
    prefill). A step reads every weight once (layers + lm_head; the embedding rows it gathers are not counted) and
    each active request's K/V (prompt + generated tokens so far), and takes max(bytes / copy bandwidth,
    FLOPs / peak), FLOPs being 2 * weights per active request + its attention. `decode_memory_s` is the
    bytes-only sum (the pure bandwidth bound);
  * prefill and decode do not overlap: roofline output tok/s = output tokens / (prefill + decode seconds).
Norm weights and biases are counted as matmul weights (< 0.1% of a Llama's weights).

    python benchmarks/roofline.py [--only-if-gpu]    # measures the device, prints one JSON line

The measurement runs in its own process (throughput.py starts it before its engine) so that its buffers are gone
before the engine sizes its KV cache, and so that JAX and torch never share a process.
"""

import argparse
import dataclasses
import heapq
import json
import os
import subprocess
import sys

import numpy as np

from workloads import BenchRequest


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """What the roofline needs of a model: weight counts, K/V size per token and attention FLOPs per pair."""

    layer_params: int          # all decoder layers' weights and the final norm
    vocab_params: int          # vocab * hidden: the lm_head (the embedding itself when tied)
    kv_elems_per_token: int    # 2 * layers * kv_heads * head_dim
    attn_flops_per_pair: int   # 4 * layers * heads * head_dim: QK^T and PV of one query-key pair
    dtype_bytes: int           # of weights and K/V

    @classmethod
    def from_config(cls, cfg, dtype_bytes: int) -> "ModelCounts":
        """From a `jaxpaged.models.ModelConfig`."""
        h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size + 2 * h
        if cfg.attention_bias:
            per_layer += q + 2 * kv
        return cls(layer_params=cfg.num_hidden_layers * per_layer + h, vocab_params=cfg.vocab_size * h,
                   kv_elems_per_token=2 * cfg.num_hidden_layers * kv,
                   attn_flops_per_pair=4 * cfg.num_hidden_layers * q, dtype_bytes=dtype_bytes)

    @property
    def weight_bytes(self) -> int:
        return (self.layer_params + self.vocab_params) * self.dtype_bytes


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Lower-bound seconds of a workload and the output tok/s they allow."""

    prefill_s: float
    decode_s: float
    decode_memory_s: float
    decode_steps: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / (self.prefill_s + self.decode_s)


def slot_starts(decode_steps: list[int], max_num_seqs: int) -> list[int]:
    """The step at which each request starts decoding when requests take the first free of `max_num_seqs` slots
    in order; requests with no decode step start at 0 and take no slot."""
    free = [0] * max_num_seqs
    starts = []
    for d in decode_steps:
        if d <= 0:
            starts.append(0)
            continue
        start = heapq.heappop(free)
        starts.append(start)
        heapq.heappush(free, start + d)
    return starts


def per_step_load(prompt_lens: np.ndarray, decode_steps: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, ...]:
    """([steps] active requests, [steps] K/V tokens read) per decode step.

    A request started at s with prompt p reads p + k K/V tokens at its k-th decode step (step s + k - 1), i.e.
    (p + 1 - s) + t at step t: both sums are built with difference arrays.
    """
    num_steps = int((starts + decode_steps).max(initial=0))
    count, offset = np.zeros(num_steps + 1, np.int64), np.zeros(num_steps + 1, np.int64)
    live = decode_steps > 0
    s, e, p = starts[live], (starts + decode_steps)[live], prompt_lens[live]
    np.add.at(count, s, 1)
    np.add.at(count, e, -1)
    np.add.at(offset, s, p + 1 - s)
    np.add.at(offset, e, -(p + 1 - s))
    count, offset = np.cumsum(count)[:-1], np.cumsum(offset)[:-1]
    return count, offset + np.arange(num_steps) * count


def workload_roofline(counts: ModelCounts, requests: list[BenchRequest], max_num_seqs: int, peak_flops: float,
                      copy_bytes_per_s: float) -> Roofline:
    """The roofline of `requests` (see the module docstring for the model)."""
    prompt = np.array([len(r.prompt_token_ids) for r in requests], np.int64)
    outputs = np.array([r.output_len for r in requests], np.int64)
    prefill_flops = (2 * counts.layer_params * prompt.sum() + 2 * counts.vocab_params * len(requests)
                     + counts.attn_flops_per_pair * (prompt * (prompt + 1) // 2).sum())
    steps = outputs - 1
    active, kv_tokens = per_step_load(prompt, steps, np.array(slot_starts(steps.tolist(), max_num_seqs), np.int64))
    memory_s = (counts.weight_bytes + kv_tokens * counts.kv_elems_per_token * counts.dtype_bytes) / copy_bytes_per_s
    compute_s = (2 * (counts.layer_params + counts.vocab_params) * active
                 + counts.attn_flops_per_pair * kv_tokens) / peak_flops
    return Roofline(prefill_s=float(prefill_flops / peak_flops), decode_s=float(np.maximum(memory_s, compute_s).sum()),
                    decode_memory_s=float(memory_s.sum()), decode_steps=len(active),
                    output_tokens=int(outputs.sum()))


def measure_device(matmul_n: int, copy_gib: int) -> dict:
    """bf16 [n, n] @ [n, n] FLOP/s and copy bandwidth (bytes read + written per s) of JAX's default device, with
    kernel_bench.py's timing (the slope between 10 and 60 chained calls, fastest of 5 runs: no dispatch cost)."""
    import jax
    import jax.numpy as jnp

    from kernel_bench import copy_bandwidth, time_us

    a, b = (jax.random.normal(jax.random.key(i), (matmul_n, matmul_n), jnp.bfloat16) / matmul_n ** 0.5
            for i in range(2))  # unit-scale rows: chained products neither overflow nor vanish
    us = time_us(lambda x, _, w: x @ w, a, jnp.zeros((1,)), fixed=(b,))
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "matmul_n": matmul_n,
            "peak_flops": 2 * matmul_n ** 3 / (us * 1e-6), "copy_bytes_per_s": copy_bandwidth(copy_gib)}


def measure_in_subprocess(only_if_gpu: bool) -> dict:
    """Runs this file in a fresh Python (same interpreter and environment); returns its JSON, {"skipped": True, ...}
    when `only_if_gpu` and the device is not a GPU, or {"error": ...} when it failed."""
    cmd = [sys.executable, os.path.abspath(__file__)] + (["--only-if-gpu"] if only_if_gpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"error": f"roofline measurement failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only-if-gpu", action="store_true", help="print {skipped: true} at once on other devices")
    args = p.parse_args()
    import jax

    backend = jax.default_backend()
    if args.only_if_gpu and backend != "gpu":
        print(json.dumps({"backend": backend, "skipped": True}))
        return
    sizes = (8192, 4) if backend == "gpu" else (1024, 1)  # small on CPU: a forced run there only proves it runs
    print(json.dumps(measure_device(*sizes)), flush=True)


if __name__ == "__main__":
    main()
