"""warm_up(background=True): ready with a set of programs that runs every step, the rest compiled afterwards;
steps run in the smallest compiled bucket that holds them, and as single steps until the multi-step decodes exist.
The embedded SmolLM2-135M-Instruct (fp32, CPU) against HF transformers' greedy tokens."""

import json
import os

import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged import runner as runner_module

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "smollm2_greedy.json")
# token buckets 16, 32, 64 (first: 64 and 16), sequence bucket 8; multi-step decodes of 4 steps
ENGINE_KW = dict(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
                 num_scheduler_steps=4)

pytestmark = pytest.mark.skipif(not os.path.exists(FIXTURE), reason="HF greedy fixture not generated")


def _generate_fixture(llm) -> None:
    with open(FIXTURE) as f:
        cases = json.load(f)["cases"]
    prompts = [{"prompt_token_ids": c["prompt_token_ids"]} for c in cases]
    params = SamplingParams(temperature=0, max_tokens=len(cases[0]["hf_token_ids"]), ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [c["hf_token_ids"] for c in cases]


class _Held:
    """Stands in for BackgroundCompiler: records the keys left to the background and compiles none of them."""

    def __init__(self, runner, keys, on_done):
        self.keys = keys

    def join(self):
        pass


def _forwards(runner) -> list[tuple[int, int]]:
    return sorted(k[1:] for k in runner.executables if k[0] == "forward")


def test_steps_run_in_larger_buckets_and_single_steps_until_the_background_programs_exist(monkeypatch):
    monkeypatch.setattr(runner_module, "BackgroundCompiler", _Held)
    llm = LLM(**ENGINE_KW)
    engine = llm.llm_engine
    runner = engine.runner
    engine.warm_up(background=True)
    assert _forwards(runner) == [(16, 8), (64, 8)]
    assert sorted(k[1] for k in runner._background.keys if k[0] == "forward") == [32]
    assert len([k for k in runner._background.keys if k[0] == "decode"]) == 6  # 1 sequence bucket x 6 samplers
    assert not runner.multi_step_ready.is_set()
    compiled = dict(runner.executables)
    before = {m.name: m.value for m in llm.get_metrics()}
    # A 20-token prompt: its bucket (32, 8) is not compiled, so it runs in (64, 8).
    llm.generate({"prompt_token_ids": list(range(1000, 1020))},
                 SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    after = {m.name: m.value for m in llm.get_metrics()}
    assert after["jaxpaged:step_tokens"] - before["jaxpaged:step_tokens"] == 20 + 4
    assert after["jaxpaged:step_padding_tokens"] - before["jaxpaged:step_padding_tokens"] == 44 + 4 * 15
    _generate_fixture(llm)  # same tokens as HF, with single steps only
    assert runner.executables == compiled  # nothing compiled on demand, no multi-step decode ran


def test_background_programs_are_used_once_compiled():
    llm = LLM(**ENGINE_KW)
    engine = llm.llm_engine
    engine.warm_up(background=True)
    engine.runner.wait_for_background()
    assert engine.runner.multi_step_ready.is_set()
    assert _forwards(engine.runner) == [(16, 8), (32, 8), (64, 8)]
    assert len([k for k in engine.runner.executables if k[0] == "decode"]) == 6
    compiled = dict(engine.runner.executables)
    _generate_fixture(llm)
    assert engine.runner.executables == compiled
