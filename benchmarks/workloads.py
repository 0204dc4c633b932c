"""Benchmark workloads as token-id requests: vLLM's random dataset and nano-vllm's `bench.py` workload.

Shared by throughput.py (offline), serving.py (HTTP client) and step_profile.py. Prompts are random token ids, so
no tokenizer is needed and no two prompts share a prefix.
"""

import dataclasses
import math
import random

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: its prompt token ids and how many tokens to generate (always exactly, ignore_eos)."""

    prompt_token_ids: list[int]
    output_len: int


def range_bounds(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """vLLM's inclusive length interval [floor(len * (1 - r)), ceil(len * (1 + r))], raised to `minimum`."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio!r}")
    low = math.floor(length * (1 - range_ratio))
    high = math.ceil(length * (1 + range_ratio))
    return max(low, minimum), max(high, minimum)


def random_lengths(num: int, length: int, range_ratio: float, rng: np.random.Generator,
                   minimum: int = 0) -> np.ndarray:
    """[num] lengths uniform in `range_bounds(length, range_ratio, minimum)` (vLLM's --random-range-ratio)."""
    low, high = range_bounds(length, range_ratio, minimum)
    return rng.integers(low, high + 1, size=num)


def token_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of random prompt token ids: [100, 30000) capped to the vocabulary (ids below 100 are often
    special tokens)."""
    return min(100, vocab_size // 2), min(vocab_size, 30000)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    """vLLM's random dataset on token ids: input and output lengths uniform within +-range_ratio of the given
    lengths (outputs at least 1 token).

    NOTE: the token ids come from `default_rng(seed)` in one draw, so with range_ratio 0 the prompts are the ones
    this script has always used (comparable with earlier RESULTS.md runs); lengths come from `default_rng(seed + 1)`.
    """
    lengths_rng = np.random.default_rng(seed + 1)
    in_lens = random_lengths(num, input_len, range_ratio, lengths_rng, minimum=1)
    out_lens = random_lengths(num, output_len, range_ratio, lengths_rng, minimum=1)
    low, high = token_range(vocab_size)
    tokens = np.random.default_rng(seed).integers(low, high, size=int(in_lens.sum()))
    prompts = np.split(tokens, np.cumsum(in_lens)[:-1])
    return [BenchRequest(p.tolist(), int(o)) for p, o in zip(prompts, out_lens)]


def nano_vllm_requests(num: int = 512, vocab_size: int = 128256, seed: int = 0, min_len: int = 100,
                       max_len: int = 1024) -> list[BenchRequest]:
    """nano-vllm's bench.py workload: prompts of randint(100, 1024) token ids randint(0, 10000), then output
    lengths randint(100, 1024), all from Python's `random` seeded with `seed` (nano-vllm: 256 sequences, seed 0;
    the same draws in the same order, so its first prompts are ours)."""
    rng = random.Random(seed)
    top = min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]
    return [BenchRequest(p, rng.randint(min_len, max_len)) for p in prompts]


def workload_summary(requests: list[BenchRequest]) -> dict:
    """Request count and token totals / extremes, for the JSON record."""
    ins = [len(r.prompt_token_ids) for r in requests]
    outs = [r.output_len for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": sum(ins), "output_tokens": sum(outs),
            "input_len_range": [min(ins), max(ins)], "output_len_range": [min(outs), max(outs)]}
