"""Greedy outputs do not depend on prefix caching, pool size (preemption) or batch composition."""

import contextlib

import pytest

from jaxpaged import LLM, BeamSearchParams, SamplingParams

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


def test_forked_families_preempted_in_a_tiny_pool_sample_as_alone(baseline, small_pool):
    llm = baseline[0]
    params = SamplingParams(temperature=0.8, max_tokens=60, ignore_eos=True, seed=5, n=3)
    before = small_pool.llm_engine.scheduler.num_preemptions
    families = small_pool.generate(PROMPTS[:3], params, use_tqdm=False)
    assert small_pool.llm_engine.scheduler.num_preemptions > before
    singles = [SamplingParams(temperature=0.8, max_tokens=60, ignore_eos=True, seed=5 + i) for i in range(3)]
    alone = llm.generate([p for p in PROMPTS[:3] for _ in range(3)], singles * 3, use_tqdm=False)
    assert [c.token_ids for f in families for c in f.outputs] == [a.outputs[0].token_ids for a in alone]
    small_pool.llm_engine.page_manager.check_invariants()
    assert small_pool.llm_engine.page_manager.usage == 0.0


def test_beam_search_preempted_in_a_tiny_pool_restarts_with_the_same_beams(baseline, small_pool):
    llm = baseline[0]
    params = BeamSearchParams(beam_width=3, max_tokens=60, ignore_eos=True)
    expected = llm.beam_search(PROMPTS[1], params)[0].sequences
    engine = small_pool.llm_engine
    before = engine.scheduler.num_preemptions
    for i, prompt in enumerate(PROMPTS[:1] + PROMPTS[2:]):  # admitted first: the beams, newest, go first
        engine.add_request(f"other-{i}", prompt, PARAMS)
    engine.add_beam_request("beams", PROMPTS[1], params)
    beams = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            beams = out if out.request_id == "beams" else beams
        engine.page_manager.check_invariants()
    assert engine.scheduler.num_preemptions > before and engine.beams.num_restarts > 0
    assert [c.token_ids for c in beams.outputs] == [s.tokens[len(beams.prompt_token_ids):] for s in expected]
    assert [c.cumulative_logprob for c in beams.outputs] == pytest.approx([s.cum_logprob for s in expected])
    assert engine.page_manager.usage == 0.0


@contextlib.contextmanager
def configured(llm, async_scheduling=True, num_scheduler_steps=1):
    """The engine with other scheduling settings for a while (one compiled model serves several tests)."""
    engine = llm.llm_engine
    engine.args.async_scheduling, engine.scheduler.num_scheduler_steps = async_scheduling, num_scheduler_steps
    try:
        yield engine
    finally:
        engine.args.async_scheduling, engine.scheduler.num_scheduler_steps = True, 1


def stepped(engine, params=PARAMS):
    """Greedy token ids of PROMPTS driven step by step, and the number of engine steps taken."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert engine.page_manager.usage == 0
    return [done[str(i)] for i in range(len(PROMPTS))], steps


def test_async_scheduling_off_gives_same_outputs(baseline, small_pool):
    _, tokens, _ = baseline
    with configured(small_pool, async_scheduling=False) as engine:  # synchronous, and preempting
        before = engine.scheduler.num_preemptions
        sync, _ = run(small_pool)
    assert sync == tokens
    assert engine.scheduler.num_preemptions > before


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_multi_step_decode_gives_same_outputs_in_fewer_steps(baseline, small_pool, async_scheduling):
    _, tokens, _ = baseline
    _, single_steps = stepped(small_pool.llm_engine)
    with configured(small_pool, async_scheduling, num_scheduler_steps=4) as engine:
        steady, planned = engine.scheduler.steady, []
        plan = steady.schedule
        steady.schedule = lambda *args: planned.append(plan(*args)) or planned[-1]
        try:
            multi, multi_steps = stepped(engine)  # decode loops on the device, in a pool that preempts
        finally:
            del steady.schedule
    assert multi == tokens
    assert multi_steps < single_steps * 0.6, (multi_steps, single_steps)
    assert sum(p is not None for p in planned) >= 3  # steps planned over SteadyDecode's arrays


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_multi_step_with_prefill_gives_same_outputs_while_requests_arrive(baseline, small_pool, async_scheduling):
    """Each prompt arrives two steps after the previous one, so prefills meet running decodes: with
    `multi_step_with_prefill` those steps decode on after their forward pass, and the tokens do not change."""
    _, tokens, _ = baseline
    with configured(small_pool, async_scheduling, num_scheduler_steps=4) as engine:
        engine.scheduler.multi_step_with_prefill = True
        launches = []
        launch = engine.runner.launch
        engine.runner.launch = lambda sched, pages_of: launches.append(sched.with_prefill) or launch(sched, pages_of)
        try:
            done, step = {}, 0
            while len(done) < len(PROMPTS):
                if step % 2 == 0 and step // 2 < len(PROMPTS):
                    engine.add_request(str(step // 2), PROMPTS[step // 2], PARAMS)
                done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
                step += 1
            while engine.has_unfinished_requests():
                engine.step()
        finally:
            engine.scheduler.multi_step_with_prefill = False
            del engine.runner.launch
    assert [done[str(i)] for i in range(len(PROMPTS))] == tokens
    assert sum(launches) >= 3  # steps that prefilled and decoded on
    assert engine.page_manager.usage == 0


def test_multi_step_decode_stops_where_single_steps_stop(baseline, small_pool):
    """Stop strings, stop ids, EOS and max_tokens met inside a multi-step decode: the extra tokens are dropped."""
    single = baseline[0]
    params = [SamplingParams(temperature=0, max_tokens=n, stop=stop, stop_token_ids=ids, logprobs=lp)
              for n, stop, ids, lp in [(3, [], [], None), (40, [" the", "."], [], 1), (17, [], [], None),
                                       (40, ["\n"], [], None), (9, [], [13], 2), (40, [], [13], None)]]
    want = single.generate(PROMPTS, params, use_tqdm=False)
    with configured(small_pool, num_scheduler_steps=8):
        got = small_pool.generate(PROMPTS, params, use_tqdm=False)
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason,
                                                                        w.stop_reason)
        assert (g.logprobs is None) == (w.logprobs is None)
        for gl, wl in zip(g.logprobs or [], w.logprobs or []):  # other batch shapes: float32 rounding only
            assert [(t, x.rank) for t, x in gl.items()] == [(t, x.rank) for t, x in wl.items()]
            assert [x.logprob for x in gl.values()] == pytest.approx([x.logprob for x in wl.values()], abs=1e-4)
    assert small_pool.llm_engine.page_manager.usage == 0
