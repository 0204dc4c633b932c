"""Greedy outputs do not depend on prefix caching, pool size (preemption) or batch composition."""

import pytest

from jaxpaged import LLM, SamplingParams

KW = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, seed=0)
PREFIX = "You are a helpful assistant. Answer briefly, precisely and truthfully, in plain English.\n"
PROMPTS = [PREFIX + p for p in [  # the shared prefix fills a whole page: later prompts hit it
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "The capital of France is a city that",
    "def fibonacci(n):",
    "Water boils at",
]]
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def run(llm, prompts=PROMPTS):
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    m = {x.name: x.value for x in llm.get_metrics()}
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
    return [o.outputs[0].token_ids for o in outs], m


@pytest.fixture(scope="module")
def baseline():
    llm = LLM(**KW)
    tokens, _ = run(llm)
    alone = [run(llm, [p])[0][0] for p in PROMPTS]
    return llm, tokens, alone


def test_batch_of_one_equals_batch_of_many(baseline):
    _, tokens, alone = baseline
    assert alone == tokens


def test_prefix_cache_hits_do_not_change_outputs(baseline):
    llm, tokens, _ = baseline
    again, m = run(llm)  # every prompt's full pages are cached now
    assert again == tokens
    assert m["vllm:prefix_cache_hits"] > 0


def test_prefix_caching_off_gives_same_outputs(baseline):
    _, tokens, _ = baseline
    llm = LLM(**KW, enable_prefix_caching=False)
    off, m = run(llm)
    assert off == tokens
    assert m["vllm:prefix_cache_hits"] == 0


@pytest.fixture(scope="module")
def small_pool():
    return LLM(**KW, num_gpu_blocks_override=20)  # 19 usable pages; 6 requests need ~24


def test_tiny_pool_preempts_and_resumes_with_same_tokens(baseline, small_pool):
    _, tokens, _ = baseline
    small, m = run(small_pool)
    assert m["vllm:num_preemptions"] > 0
    assert small == tokens


def test_async_scheduling_off_gives_same_outputs(baseline, small_pool):
    _, tokens, _ = baseline
    engine = small_pool.llm_engine
    engine.args.async_scheduling = False  # synchronous, and preempting
    before = engine.scheduler.num_preemptions
    try:
        sync, _ = run(small_pool)
    finally:
        engine.args.async_scheduling = True
    assert sync == tokens
    assert engine.scheduler.num_preemptions > before
