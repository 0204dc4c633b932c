"""`LLM.beam_search` on the embedded model (float32) against HF transformers' beam search, and its page sharing."""

import json
import os

import pytest

from jaxpaged import LLM, BeamSearchParams, SamplingParams
from jaxpaged.beam_search import beam_score

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_beams.json")
with open(FIXTURE) as f:
    CASES = {(c["prompt"], c["eos"]): c for c in json.load(f)["cases"]}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, seed=0)


def search(llm, case, **kw):
    params = BeamSearchParams(beam_width=case["beam_width"], max_tokens=case["max_tokens"],
                              ignore_eos=not case["eos"], **kw)
    return llm.beam_search(case["prompt"], params)[0].sequences


def test_beams_without_eos_equal_transformers(llm):
    case = CASES[("The capital of France is", False)]
    beams = search(llm, case)
    n = len(case["prompt_token_ids"])
    assert [b.tokens[:n] for b in beams] == [case["prompt_token_ids"]] * 4
    assert [b.tokens[n:] for b in beams] == case["hf_token_ids"]
    assert [b.cum_logprob for b in beams] == pytest.approx(case["hf_cum_logprobs"], abs=1e-3)
    assert [b.finish_reason for b in beams] == ["length"] * 4
    assert beams[0].text == " Paris. The capital of Italy is Rome"
    for b in beams:  # the logprob of every chosen token, summed, is the beam's cum_logprob
        chosen = [lps[t].logprob for t, lps in zip(b.tokens[n:], b.logprobs)]
        assert sum(chosen) == pytest.approx(b.cum_logprob, abs=1e-4)
        assert all(len(lps) == 8 for lps in b.logprobs)  # 2 x beam_width candidates per step


def test_beams_with_eos_equal_transformers_where_the_rules_agree(llm):
    case = CASES[("Hi", True)]
    beams = search(llm, case)
    assert [b.tokens[len(case["prompt_token_ids"]):] for b in beams] == case["hf_token_ids"]
    assert [b.cum_logprob for b in beams] == pytest.approx(case["hf_cum_logprobs"], abs=1e-3)


def test_a_short_finished_beam_wins_under_vllms_length_normalisation(llm):
    # vLLM divides by prompt + output length: " Paris." + EOS (cum -3.57 over 7 tokens) beats every 12-token beam;
    # HF divides by the generated length (3) and returns the 12-token beams. The others equal HF's best two.
    case = CASES[("The capital of France is", True)]
    beams = search(llm, case)
    n = len(case["prompt_token_ids"])
    eos = llm.get_tokenizer().eos_token_id
    assert beams[0].tokens[n:] == [7042, 30, eos] and beams[0].finish_reason == "stop"
    assert beams[0].text == " Paris."  # EOS out of the text
    assert beams[0].cum_logprob / 7 > case["hf_cum_logprobs"][0] / 17
    assert [b.tokens[n:] for b in beams[1:]] == case["hf_token_ids"][:2]
    assert [b.cum_logprob for b in beams[1:]] == pytest.approx(case["hf_cum_logprobs"][:2], abs=1e-3)
    with_eos = llm.beam_search(case["prompt"], BeamSearchParams(3, 12, include_stop_str_in_output=True))
    assert with_eos[0].sequences[0].text == " Paris.<|im_end|>"


def test_beams_share_the_prompt_pages_and_batch_with_other_requests(llm):
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": [(11 * i) % 3000 + 400 for i in range(100)]}  # 6 full pages + 4 tokens
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
    beams_alone = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    engine.add_beam_request("beams", prompt, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    engine.add_request("plain", "Once upon a time", greedy)
    free, used, outs = engine.page_manager.num_free_pages, [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
        used.append(free - engine.page_manager.num_free_pages)
        engine.page_manager.check_invariants()
    assert outs["plain"].outputs[0].token_ids == alone
    assert [c.token_ids for c in outs["beams"].outputs] == [s.tokens[100:] for s in beams_alone[0].sequences]
    assert 7 <= max(used) <= 7 + 3 + 2  # the 7 prompt pages shared by the 4 beams (+ 3 copies of the last) + 2
    assert used[-1] == 0


def test_invalid_beam_search_arguments_raise_and_queue_nothing(llm):
    for kwargs, word in [({"beam_width": 0}, "beam_width"), ({"beam_width": 11}, "beam_width"),
                         ({"max_tokens": 0}, "max_tokens"), ({"length_penalty": float("nan")}, "length_penalty")]:
        with pytest.raises(ValueError, match=word):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="beam_width=9 .* max_num_seqs=8"):
        llm.beam_search("Hi", BeamSearchParams(beam_width=9, max_tokens=4))
    assert not llm.llm_engine.has_unfinished_requests()
    tiny = LLM(os.path.join(os.path.dirname(FIXTURE), "llama2_mha_untied"), dtype="float32", max_model_len=64,
               max_num_seqs=4, num_gpu_blocks_override=10)  # 9 pages of 16 tokens
    with pytest.raises(ValueError, match="beam_width=4 beams of up to 70 tokens may need 16 KV pages; the pool "
                                         "holds 9"):
        tiny.beam_search({"prompt_token_ids": list(range(10))}, BeamSearchParams(beam_width=4, max_tokens=60))
    assert not tiny.llm_engine.has_unfinished_requests()
    out = tiny.beam_search({"prompt_token_ids": list(range(10))}, BeamSearchParams(beam_width=2, max_tokens=20))
    assert [len(s.tokens) for s in out[0].sequences] == [30, 30]
    with pytest.raises(ValueError, match="prompt 1: beam_width=4 beams of up to 55 tokens may need 16 KV pages"):
        tiny.beam_search([{"prompt_token_ids": [5]}, {"prompt_token_ids": list(range(40))}],
                         BeamSearchParams(beam_width=4, max_tokens=15))  # prompt 0 was queued: it is aborted
    assert not tiny.llm_engine.has_unfinished_requests() and tiny.llm_engine.page_manager.usage == 0
    with pytest.raises(ValueError, match=r"prompt 1: Token id 1000000 is out of vocabulary"):
        llm.beam_search(["Hi", {"prompt_token_ids": [10**6]}], BeamSearchParams(beam_width=2, max_tokens=4))
    assert not llm.llm_engine.has_unfinished_requests()


def test_beam_scores_past_a_floats_range_saturate_in_order():
    assert beam_score(7, False, -3.0, 2.0) == -3.0 / 49  # in range: vLLM's quotient as it is
    assert beam_score(7, True, -3.0, 2.0) == -3.0 / 36  # a final EOS is not counted
    huge = [beam_score(600, False, c, 397.0) for c in (-1e-300, -2.0)]  # 600 ** 397 overflows a float
    assert huge == [-0.0, -0.0]
    tiny = [beam_score(600, False, c, -400.0) for c in (-0.5, -2.0)]  # 600 ** -400 is 0.0
    assert tiny[0] == tiny[1] < -1e307 and beam_score(600, False, 0.0, -400.0) == 0.0
    assert 0 > beam_score(600, False, -1e300, 120.0) > beam_score(600, False, -1e301, 120.0)  # through logarithms


@pytest.mark.parametrize("length_penalty", [397.0, -400.0])
def test_extreme_length_penalties_finish_without_failing_the_step(llm, length_penalty):
    # the server's fuzz test sent length_penalty=397 to /v1/completions: the step raised OverflowError
    out = llm.beam_search("The quick brown fox jumps over", BeamSearchParams(beam_width=2, max_tokens=3,
                                                                            length_penalty=length_penalty))
    assert len(out[0].sequences) == 2 and all(len(s.tokens) > 3 for s in out[0].sequences)


def test_aborted_beam_search_frees_its_pages(llm):
    engine = llm.llm_engine
    engine.add_beam_request("gone", "Tell me a story", BeamSearchParams(beam_width=3, max_tokens=50))
    for _ in range(6):
        engine.step()
    assert engine.page_manager.usage > 0
    engine.abort_request(["gone"])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.page_manager.usage == 0.0 and not engine.beams.groups
