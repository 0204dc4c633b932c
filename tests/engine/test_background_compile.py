"""warm_up(background=True): ready with a set of programs that runs every step, the rest compiled afterwards;
steps run in the smallest compiled bucket that holds them, as single steps until the stand-in multi-step decodes
exist, then with those until their own are compiled.
The embedded SmolLM2-135M-Instruct (fp32, CPU) against HF transformers' greedy tokens."""

import sys
import threading

import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged import runner as runner_module
from jaxpaged.background_compile import BackgroundCompiler
from jaxpaged.sampler import SamplerFlags
from jaxpaged.step_programs import BANNED_MIN
from tests.engine.hf_greedy import assert_greedy_matches_hf, needs_fixture

# token buckets 16, 32, 64 (first: 64 and 16), sequence bucket 8; multi-step decodes of 4 steps
ENGINE_KW = dict(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
                 num_scheduler_steps=4)

pytestmark = needs_fixture


class _Held:
    """Stands in for BackgroundCompiler: records the keys left to the background and compiles none of them."""

    def __init__(self, runner, keys, first, on_first):
        self.keys, self.first = keys, first

    def join(self):
        pass


def _forwards(runner) -> list[tuple[int, int]]:
    return sorted(k[1:] for k in runner.executables if k[0] == "forward")


def _warm_up_with(monkeypatch, compiler):
    """An LLM warmed up in the background with `compiler` standing in for BackgroundCompiler; (llm, its runner)."""
    monkeypatch.setattr(runner_module, "BackgroundCompiler", compiler)
    llm = LLM(**ENGINE_KW)
    llm.llm_engine.warm_up(background=True)
    return llm, llm.llm_engine.runner


def test_steps_run_in_larger_buckets_and_single_steps_until_the_background_programs_exist(monkeypatch):
    llm, runner = _warm_up_with(monkeypatch, _Held)
    assert _forwards(runner) == [(16, 8), (64, 8)]
    assert sorted(k[1] for k in runner._background.keys if k[0] == "forward") == [32]
    assert len([k for k in runner._background.keys if k[0] == "decode"]) == 6  # 1 sequence bucket x 6 samplers
    wide = {("decode", 8, 4, SamplerFlags(True, False, True)), ("decode", 8, 4, SamplerFlags(True, True, True))}
    assert set(runner._background.keys[:2]) == set(runner._background.first) == wide  # compiled first
    assert {k[2] for k in runner.executables if k[0] == "sample"} == {SamplerFlags(True, False, True),
                                                                     SamplerFlags(True, True, True)}
    assert len([k for k in runner._background.keys if k[0] == "sample"]) == 4
    assert not runner.multi_step_ready.is_set()
    compiled = dict(runner.executables)
    before = {m.name: m.value for m in llm.get_metrics()}
    # A 20-token prompt: its bucket (32, 8) is not compiled, so it runs in (64, 8).
    llm.generate({"prompt_token_ids": list(range(1000, 1020))},
                 SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    after = {m.name: m.value for m in llm.get_metrics()}
    assert after["jaxpaged:step_tokens"] - before["jaxpaged:step_tokens"] == 20 + 4
    assert after["jaxpaged:step_padding_tokens"] - before["jaxpaged:step_padding_tokens"] == 44 + 4 * 15
    assert_greedy_matches_hf(llm)  # same tokens as HF, with single steps and the sampler that also samples at random
    seeded = _seeded(llm)  # sampled by the sampler that also computes logprobs
    assert runner.executables == compiled  # nothing compiled on demand, no multi-step decode ran
    runner._background = None  # as if the background compile were done: each step's own programs, compiled now
    assert _seeded(llm) == seeded
    assert ("sample", 8, SamplerFlags(True, False, False), 1, BANNED_MIN) in runner.executables


class _FirstOnly(_Held):
    """Stands in for BackgroundCompiler: compiles only the programs multi-step steps wait for, then lets them run."""

    def __init__(self, runner, keys, first, on_first):
        super().__init__(runner, keys, first, on_first)
        for key in first:
            runner.executables[key] = runner._compile(key)[1]
        on_first()


def test_multi_step_decodes_run_with_the_wider_sampler_until_their_own_is_compiled(monkeypatch):
    llm, runner = _warm_up_with(monkeypatch, _FirstOnly)
    assert runner.multi_step_ready.is_set()
    wide = SamplerFlags(True, False, True)
    assert {k[3] for k in runner.executables if k[0] == "decode"} == {wide, SamplerFlags(True, True, True)}
    used, program = [], runner._program
    monkeypatch.setattr(runner, "_program", lambda key: used.append(key) or program(key))
    assert_greedy_matches_hf(llm)  # greedy rows in the decode that also samples at random and computes logprobs
    seeded = _seeded(llm)
    assert used.count(("decode", 8, 4, wide)) >= 2 and not [k for k in used if k[0] == "decode" and k[3] != wide]
    runner._background = None  # as if the background compile were done: each decode's own sampler, compiled now
    assert _seeded(llm) == seeded
    assert ("decode", 8, 4, SamplerFlags(True, False, False)) in used


def _seeded(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(range(500 + 20 * i, 512 + 20 * i))} for i in range(3)], params,
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_background_programs_are_used_once_compiled():
    llm = LLM(**ENGINE_KW)
    engine = llm.llm_engine
    engine.warm_up(background=True)
    engine.runner.wait_for_background()
    assert engine.runner.multi_step_ready.is_set()
    assert _forwards(engine.runner) == [(16, 8), (32, 8), (64, 8)]
    assert len([k for k in engine.runner.executables if k[0] == "decode"]) == 6
    compiled = dict(engine.runner.executables)
    assert_greedy_matches_hf(llm)
    assert engine.runner.executables == compiled


class _Gated:
    """A runner whose programs compile when `release` is set; the key "bad" fails."""

    def __init__(self):
        self.executables, self.release = {}, threading.Event()

    def _compile(self, key):
        self.release.wait()
        if key == ("bad",):
            raise RuntimeError("compile failed")
        return key, object()


@pytest.mark.parametrize("keys, first, ready", [([("a",), ("b",), ("c",)], [("a",), ("c",)], True),
                                                ([("a",), ("bad",), ("c",)], [("a",)], True),
                                                ([("a",), ("bad",), ("c",)], [("bad",), ("c",)], False)])
def test_background_compiles_shorten_the_gil_switch_interval_until_done(keys, first, ready):
    before = sys.getswitchinterval()
    runner, done = _Gated(), threading.Event()
    compiler = BackgroundCompiler(runner, keys, first, done.set)
    assert sys.getswitchinterval() == pytest.approx(BackgroundCompiler.SWITCH_INTERVAL)
    runner.release.set()
    compiler.join()
    assert sys.getswitchinterval() == before
    assert done.is_set() == ready  # a failed program of `first` keeps its fallback: multi-step decodes stay off
    assert sorted(runner.executables) == sorted(k for k in keys if k != ("bad",))


def test_background_compile_threads_are_not_daemons_even_when_started_by_one():
    """The server starts them from its (daemon) engine thread; a daemon killed mid-compile at exit aborts."""
    runner, made = _Gated(), []
    starter = threading.Thread(target=lambda: made.append(
        BackgroundCompiler(runner, [("a",), ("b",)], [], lambda: None)), daemon=True)
    starter.start()
    starter.join()
    assert [t.daemon for t in made[0]._threads] == [False, False]
    runner.release.set()
    made[0].join()
