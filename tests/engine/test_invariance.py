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


def test_tiny_pool_preempts_and_resumes_with_same_tokens(baseline):
    _, tokens, _ = baseline
    llm = LLM(**KW, num_gpu_blocks_override=20)  # 19 usable pages; 6 requests need ~24
    small, m = run(llm)
    assert m["vllm:num_preemptions"] > 0
    assert small == tokens


def test_async_scheduling_off_gives_same_outputs(baseline):
    _, tokens, _ = baseline
    llm = LLM(**KW, async_scheduling=False, num_gpu_blocks_override=20)  # synchronous, and preempting
    sync, m = run(llm)
    assert sync == tokens
    assert m["vllm:num_preemptions"] > 0


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_multi_step_scheduling_gives_same_outputs(baseline, async_scheduling):
    _, tokens, _ = baseline
    llm = LLM(**KW, num_scheduler_steps=4, async_scheduling=async_scheduling, num_gpu_blocks_override=17)
    multi, m = run(llm)  # decode sub-steps, preempting
    assert multi == tokens
    assert m["vllm:num_preemptions"] > 0


def test_multi_step_stops_where_single_steps_stop(baseline):
    """Stop strings, stop ids, EOS and max_tokens met inside a multi-step decode: the extra tokens are dropped."""
    single = baseline[0]
    llm = LLM(**KW, num_scheduler_steps=8)
    params = [SamplingParams(temperature=0, max_tokens=n, stop=stop, stop_token_ids=ids, logprobs=lp)
              for n, stop, ids, lp in [(3, [], [], None), (40, [" the", "."], [], 1), (17, [], [], None),
                                       (40, ["\n"], [], None), (9, [], [13], 2), (40, [], [], None)]]
    want = single.generate(PROMPTS, params, use_tqdm=False)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason,
                                                                        w.stop_reason)
        assert (g.logprobs is None) == (w.logprobs is None)
        for gl, wl in zip(g.logprobs or [], w.logprobs or []):  # other batch shapes: float32 rounding only
            assert [(t, x.rank) for t, x in gl.items()] == [(t, x.rank) for t, x in wl.items()]
            assert [x.logprob for x in gl.values()] == pytest.approx([x.logprob for x in wl.values()], abs=1e-4)
    assert {x.name: x.value for x in llm.get_metrics()}["vllm:kv_cache_usage_perc"] == 0
