"""ModelRunner.kv_budget: the activation peak measured by compiling the largest forward bucket and sampler; the
forward compiled against the pool it runs with when a generous bound holds its peak (then not compiled again),
against a 2-page pool first otherwise. Run on CPU with a small dummy model (the budget is an accelerator's path,
the arithmetic is the same)."""

import pytest

from jaxpaged import LLM
from jaxpaged import runner as runner_module
from jaxpaged.sampler import SamplerFlags
from jaxpaged.step_programs import BANNED_MIN

KW = dict(load_format="dummy", dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
          num_gpu_blocks_override=64)
PER_PAGE = 16 << 20  # the budget's unit only: the pool allocated here has the model's own (small) pages
FREE = 2 << 30


def _runner(eight_heads):
    return LLM(eight_heads, **KW).llm_engine.runner


def _peaks(runner) -> tuple[int, int]:
    """(forward, sampler) temporary bytes of the largest buckets, compiled here against a 2-page pool."""
    tokens, seqs = max(runner.buckets.all_shapes())
    forward = runner._compile(("forward", tokens, seqs), runner._pool_specs(2))[1]
    sampler = runner._compile(("sample", seqs, SamplerFlags(True, True, True), 1, BANNED_MIN))[1]
    return forward.memory_analysis().temp_size_in_bytes, sampler.memory_analysis().temp_size_in_bytes


def test_a_peak_within_the_bound_keeps_the_pool_and_the_program(eight_heads, monkeypatch):
    runner = _runner(eight_heads)
    bound = 64 << 20
    assert max(_peaks(runner)) < bound
    monkeypatch.setattr(runner_module.ModelRunner, "_activation_bound", lambda self, num_tokens: bound)
    kv = runner.kv_budget(FREE, PER_PAGE)
    assert kv == FREE - bound
    key = ("forward", *max(runner.buckets.all_shapes()))
    program = runner.executables[key]
    assert program.input_shardings is not None
    runner.allocate_kv_pool(kv // PER_PAGE)
    runner.warm_up()
    assert runner.executables[key] is program  # compiled once, against the pool it runs with
    assert runner.kv_caches[0][0].shape[0] == (FREE - bound) // PER_PAGE


def test_a_peak_above_the_bound_sizes_the_pool_for_the_peak(eight_heads, monkeypatch):
    runner = _runner(eight_heads)
    forward_peak, sampler_peak = _peaks(runner)
    assert 0 < sampler_peak < forward_peak < PER_PAGE
    monkeypatch.setattr(runner_module.ModelRunner, "_activation_bound", lambda self, num_tokens: 0)
    free = 128 * PER_PAGE + sampler_peak  # 128 pages for the bound (the sampler's peak), 127 for the forward's
    assert runner.kv_budget(free, PER_PAGE) == free - forward_peak
    assert ("forward", *max(runner.buckets.all_shapes())) not in runner.executables  # compiled for another pool


@pytest.mark.parametrize("free", [4 << 20, 64 << 20])
def test_a_bound_over_its_share_of_a_small_device_is_measured_first(eight_heads, monkeypatch, free):
    runner = _runner(eight_heads)
    peak = max(_peaks(runner))
    monkeypatch.setattr(runner_module.ModelRunner, "_activation_bound", lambda self, num_tokens: free // 10)
    pages = []
    compile_ = runner_module.ModelRunner._compile
    monkeypatch.setattr(runner_module.ModelRunner, "_compile", lambda self, key, caches=None: (
        pages.append(None if caches is None else caches[0][0].shape[0]), compile_(self, key, caches))[1])
    assert runner.kv_budget(free, PER_PAGE) == free - peak  # the measured peak, not the bound
    assert pages == [None, 2]  # the sampler, then the forward against a 2-page pool
