"""Every step program run once at warm-up (on a GPU its first run records its CUDA graphs): each program once,
nothing a request reads changes, and steps then call each program on jax's fast dispatch path. The embedded
SmolLM2-135M-Instruct (fp32, CPU, the runs forced on), against HF transformers' greedy tokens."""

import numpy as np
from jax._src import stages

from jaxpaged import LLM, SamplingParams
from jaxpaged.page_manager import NULL_PAGE
from tests.engine.hf_greedy import assert_greedy_matches_hf, needs_fixture
from tests.engine.test_background_compile import ENGINE_KW  # the same programs: the executable cache has them

pytestmark = needs_fixture

PROMPTS = [{"prompt_token_ids": list(range(300 + 40 * i, 337 + 40 * i))} for i in range(3)]


def _state(runner) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool [layers, 2, pages, ...], page tables, slot_tokens) on the host."""
    pool = np.stack([np.stack([np.asarray(k), np.asarray(v)]) for k, v in runner.kv_caches])
    return pool, np.asarray(runner.page_tables), np.asarray(runner.slot_tokens)


def _slow_calls(monkeypatch) -> list[int]:
    """Grows by one per call of a compiled program that takes jax's slow dispatch path (its C++ fast path has no
    entry for the kinds of its arguments yet: a device or NumPy array, sharding, committed)."""
    slow, real_call = [], stages.Compiled.call
    monkeypatch.setattr(stages.Compiled, "call", staticmethod(lambda *a, **kw: slow.append(1) or real_call(*a, **kw)))
    return slow


def test_warm_up_runs_each_program_once_and_changes_nothing_a_request_reads(ran, monkeypatch):
    llm = LLM(**ENGINE_KW)
    runner = llm.llm_engine.runner
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    assert ran == []  # programs compiled on first use are not run beside the requests
    pool, tables, slot_tokens = _state(runner)

    llm.llm_engine.warm_up()

    assert len(ran) == len(set(ran)) == len(runner.executables) == 17
    assert set(ran) == set(runner.executables)
    assert {k[0] for k in ran} == {"forward", "sample", "decode", "update", "copy"}
    pool_after, tables_after, slot_tokens_after = _state(runner)
    changed = np.flatnonzero((pool_after != pool).any(axis=tuple(i for i in range(pool.ndim) if i != 2)))
    assert changed.tolist() == [NULL_PAGE]  # the runs' one token per program wrote K/V there, nowhere else
    np.testing.assert_array_equal(tables_after, tables)
    pad = runner.batch.pad_slot
    np.testing.assert_array_equal(slot_tokens_after[:pad], slot_tokens[:pad])
    # the same prompts again read their cached pages (prefix caching), then decode
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)] == first
    # programs no step had called yet (sampler variants): their first call from a step takes jax's fast path
    slow = _slow_calls(monkeypatch)
    sampled = SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=9, ignore_eos=True, logprobs=2)
    assert all(len(o.outputs[0].token_ids) == 9 for o in llm.generate(PROMPTS, sampled, use_tqdm=False))
    assert slow == []
    assert_greedy_matches_hf(llm)


def test_an_idle_engine_runs_the_background_compiled_programs_once_each(ran):
    llm = LLM(**ENGINE_KW)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    engine.warm_up(background=True)
    ready = set(ran)
    assert ready == set(runner.executables) and len(ran) == len(ready)  # the ready set ran before warm_up returned
    runner.wait_for_background()
    later = set(runner.executables) - ready
    assert later and {k[0] for k in later} >= {"forward", "decode"}
    engine.add_request("busy", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2))
    assert engine.run_idle_work() is None and len(ran) == len(ready)  # never beside a request
    while engine.has_unfinished_requests():
        engine.step()
    waits = []
    while (wait := engine.run_idle_work()) is not None:
        waits.append(wait)
    assert waits == [0.0] * len(later) and set(ran[len(ready):]) == later and len(ran) == len(set(ran))
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    assert len({tuple(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, greedy, use_tqdm=False)}) == 3
    assert_greedy_matches_hf(llm)
