"""`SamplingParams(prompt_logprobs=k)` against HF transformers' log-softmax of each prompt position (float32)."""

import json
import os

import numpy as np
import pytest

from jaxpaged import LLM, RequestOutputKind, SamplingParams

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
ATOL = 1e-4


@pytest.fixture(scope="module")
def llm():
    # a 16-token budget: the 27-token prompt is computed in two chunks
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, seed=0)


@pytest.fixture(scope="module")
def hf():
    with open(os.path.join(FIXTURES, "smollm2_prompt_logprobs.json")) as f:
        return json.load(f)


def test_prompt_logprobs_match_transformers_on_the_embedded_model(llm, hf):
    out = llm.generate(hf["prompt"], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=5),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == hf["prompt_token_ids"]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0] is None
    for entry, ref in zip(out.prompt_logprobs[1:], hf["entries"]):
        assert abs(entry[ref["token"]].logprob - ref["logprob"]) < ATOL
        top = sorted((kv for kv in entry.items() if kv[1].rank <= 5), key=lambda kv: kv[1].rank)
        assert [t for t, _ in top] == ref["top_ids"] and [lp.rank for _, lp in top] == [1, 2, 3, 4, 5]
        assert np.allclose([lp.logprob for _, lp in top], ref["top_logprobs"], atol=ATOL)
    assert out.prompt_logprobs[1][3575].decoded_token == "Ġcapital"


def test_prompt_logprobs_match_transformers_on_a_tiny_checkpoint():
    folder = os.path.join(FIXTURES, "llama2_mha_untied")
    with open(os.path.join(folder, "tokens.json")) as f:
        tokens = json.load(f)
    logits = np.load(os.path.join(folder, "hf_logits.npy")).astype(np.float64)  # [40, 128]
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # log-softmax
    tiny = LLM(folder, dtype="float32", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    out = tiny.generate({"prompt_token_ids": tokens}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)[0]
    got = [out.prompt_logprobs[i][t].logprob for i, t in enumerate(tokens) if i > 0]
    assert [len(e) for e in out.prompt_logprobs[1:]] == [1] * 39  # k = 0: the prompt token alone
    assert np.abs(np.array(got) - ref[np.arange(39), tokens[1:]]).max() < ATOL


def test_a_request_with_prompt_logprobs_skips_the_prefix_cache_and_others_still_hit(llm, hf):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    first = llm.generate(hf["prompt"], params, use_tqdm=False)[0]
    again = llm.generate(hf["prompt"], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert [e and sorted(e) for e in again.prompt_logprobs] == [e and sorted(e) for e in first.prompt_logprobs]
    plain = llm.generate(hf["prompt"], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert plain.num_cached_tokens == 16 and plain.prompt_logprobs is None


def test_delta_outputs_carry_prompt_logprobs_once_and_n_children_share_them(llm, hf):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0, n=2, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", hf["prompt"], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 3
    assert len(outs[0].prompt_logprobs) == len(hf["prompt_token_ids"])
    assert [o.prompt_logprobs for o in outs[1:]] == [None, None]
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [1, 1, 1, 1, 1, 1]
