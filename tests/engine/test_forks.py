"""`n > 1` requests fork after the prompt: computed once, pages shared until the children write (copy-on-write)."""

import pytest

from jaxpaged import LLM, SamplingParams

KW = dict(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, seed=0)


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def llm(request):
    return LLM(**KW, enable_prefix_caching=request.param)


def metrics(llm):
    return {m.name: m.value for m in llm.get_metrics()}


def test_forked_samples_equal_the_same_seeds_run_alone(llm):
    prompt = "Once upon a time"  # 4 tokens: the children share the partly filled first page
    forked = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=12, seed=99, n=4), use_tqdm=False)[0]
    alone = [llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=12, seed=99 + i), use_tqdm=False)[0]
             for i in range(4)]
    assert [c.token_ids for c in forked.outputs] == [a.outputs[0].token_ids for a in alone]
    assert [c.text for c in forked.outputs] == [a.outputs[0].text for a in alone]
    assert len({tuple(c.token_ids) for c in forked.outputs}) > 1
    assert metrics(llm)["vllm:kv_cache_usage_perc"] == 0


def test_greedy_children_equal_one_greedy_completion(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    one = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].token_ids
    params.n = 3
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [one] * 3


def test_n8_computes_a_300_token_prompt_once_and_holds_its_pages_plus_8_tails(llm):
    engine = llm.llm_engine
    prompt = [(7 * i) % 4000 + 500 for i in range(300)]  # 18 full pages of 16 and 12 tokens in the 19th
    before = metrics(llm)
    engine.add_request("n8", {"prompt_token_ids": prompt}, SamplingParams(n=8, max_tokens=4, ignore_eos=True))
    free = engine.page_manager.num_free_pages
    used, shared = [], []
    while engine.has_unfinished_requests():
        engine.step()
        used.append(free - engine.page_manager.num_free_pages)
        shared.append(metrics(llm)["jaxpaged:kv_pages_shared"])
    after = metrics(llm)
    # 300 prompt tokens once, then 3 decode tokens per child (the 4th token is sampled, not written)
    assert after["jaxpaged:step_tokens"] - before["jaxpaged:step_tokens"] == 300 + 8 * 3
    assert max(used) == 18 + 8  # the shared prompt pages and one own tail page each (7 copies of the 19th)
    assert max(shared) == 7 * 19  # right after the fork: every child holds all 19 pages
    assert used[-1] == 0 and after["vllm:kv_cache_usage_perc"] == 0


def test_n_above_max_num_seqs_is_rejected_and_queues_nothing(llm):
    with pytest.raises(ValueError, match="n=9 .* max_num_seqs=8"):
        llm.llm_engine.add_request("too-many", "Hi", SamplingParams(n=9))
    assert not llm.llm_engine.has_unfinished_requests()
