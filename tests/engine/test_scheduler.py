"""Scheduler behaviour without a model: budgets, chunked prefill, preemption order and resumption."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request, RequestStatus
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler


def make(num_pages=64, page_size=4, max_seqs=4, budget=16, caching=True, num_steps=1):
    return Scheduler(PageManager(num_pages, page_size, caching), max_seqs, budget, max_model_len=1024,
                     num_scheduler_steps=num_steps)


def add(s, rid, prompt_len, max_tokens=4, base=0):
    req = Request(rid, [base + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))
    s.add_request(req)
    return req


def add_forked(s, rid, prompt_len, n, max_tokens=4, base=0):
    """An `n > 1` request as the engine queues it: the first child, with the others to fork from it."""
    params = SamplingParams(max_tokens=max_tokens, n=n)
    children = [Request(f"{rid}-{i}", [base + j for j in range(prompt_len)], params) for i in range(n)]
    children[0].forks = children[1:]
    s.add_request(children[0])
    return children


def step(s):
    """Schedules, 'computes', samples token 7 for finished chunks (and forks) and ends requests at max_tokens."""
    out = s.schedule()
    _, reqs, steps = out.sampling_plan()
    for req, num_steps in zip(reqs, steps.tolist()):
        for _ in range(num_steps):  # the chunk's token, then one per decode sub-step
            if not req.finished:
                req.append_outputs([7])
                if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                    s.finish(req, RequestStatus.FINISHED_LENGTH)
    return out


def rows(out, *fields):
    """The step's rows as tuples of `fields` ("id" or a column of SchedulerOutput)."""
    columns = [[r.request_id for r in out.requests] if f == "id" else getattr(out, f).tolist() for f in fields]
    return list(zip(*columns))


def plan(out):
    return rows(out, "id", "starts", "counts")


def test_token_budget_chunks_prefill_and_decodes_go_first():
    s = make(budget=16)
    add(s, "a", 10)
    add(s, "b", 20, base=100)
    assert plan(step(s)) == [("a", 0, 10), ("b", 0, 6)]
    assert plan(step(s)) == [("a", 10, 1), ("b", 6, 14)]  # b's last chunk samples
    assert plan(step(s)) == [("a", 11, 1), ("b", 20, 1)]


def test_max_num_seqs_caps_running_requests():
    s = make(max_seqs=2, budget=64)
    for rid in "abc":
        add(s, rid, 3)
    out = step(s)
    assert [r.request_id for r in out.requests] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_preempts_newest_running_request_and_resumes_it_first():
    # 6 usable pages of 4 tokens; a and b take 2 pages each for prompts of 8 tokens
    s = make(num_pages=7, page_size=4, max_seqs=4, budget=64, caching=False)
    a = add(s, "a", 8, max_tokens=8)
    b = add(s, "b", 8, max_tokens=8, base=100)
    c = add(s, "c", 7, max_tokens=8, base=200)
    step(s)  # a, b admitted (4 pages); c needs 2 pages: admitted too (6 pages)
    assert [r.request_id for r in s.running] == ["a", "b", "c"]
    out = step(s)  # a and b need a third page each: no free page -> c (newest) preempted, then b
    assert [r.request_id for r in out.preempted] == ["c"]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert s.waiting[0] is c
    assert s.num_preemptions == 1
    while s.num_unfinished:
        step(s)
        s.pages.check_invariants()
    assert [len(r.output_token_ids) for r in (a, b, c)] == [8, 8, 8]
    assert c.num_preemptions >= 1
    assert s.pages.usage == 0.0


def test_waiting_requests_hit_prefix_pages_of_running_ones():
    s = make(budget=64)
    add(s, "a", 12)
    step(s)
    b = add(s, "b", 14)  # same first 12 tokens
    out = step(s)
    assert plan(out)[-1] == ("b", 12, 2)
    assert b.num_cached_tokens == 12
    assert s.pages.pages_of("b")[:3] == s.pages.pages_of("a")[:3]


def test_multi_step_decode_plans_up_to_the_step_count_within_max_tokens_and_pages():
    s = make(num_pages=8, page_size=4, budget=16, num_steps=4)
    a, b = add(s, "a", 3, max_tokens=10), add(s, "b", 5, max_tokens=2)
    assert s.schedule().num_steps == 1  # the prefills
    out = s.schedule()  # both decode, nothing waits: a plans 4 tokens, b only 1 more (max_tokens=2)
    assert rows(out, "counts", "samples", "steps") == [(1, True, 4), (1, True, 1)]
    assert out.num_steps == 4 and (a.num_pending, b.num_pending) == (5, 2)
    assert (a.num_computed_tokens, b.num_computed_tokens) == (7, 6)
    assert len(s.pages.pages_of("a")) == 2 and len(s.pages.pages_of("b")) == 2  # K/V of 7 and 6 tokens
    out = s.schedule()  # tokens still pending: b has all of its max_tokens planned, a decodes on
    assert rows(out, "id", "starts", "steps") == [("a", 7, 4)]
    assert a.num_pending == 9 and len(s.pages.pages_of("a")) == 3
    s.pages.check_invariants()


def test_multi_step_with_prefill_decodes_on_past_an_arrival_and_plans_the_forward_token_too():
    for with_prefill in (False, True):
        s = make(num_pages=64, page_size=4, max_seqs=4, budget=16, num_steps=4)
        s.multi_step_with_prefill = with_prefill
        a = add(s, "a", 6, max_tokens=20)
        step(s)  # a's prompt; it samples its first token
        add(s, "b", 10, max_tokens=20, base=100)  # arrives while a decodes
        out = step(s)
        assert rows(out, "id", "counts", "steps") == (
            [("a", 1, 5), ("b", 10, 1)] if with_prefill else [("a", 1, 1), ("b", 10, 1)])
        assert (out.num_steps, out.with_prefill) == ((4, True) if with_prefill else (1, False))
        assert a.num_computed_tokens == 6 + (5 if with_prefill else 1) and len(a.output_token_ids) == (
            6 if with_prefill else 2)
        s.pages.check_invariants()


def test_multi_step_with_prefill_keeps_single_steps_while_a_burst_exceeds_the_token_budget():
    s = make(num_pages=64, page_size=4, max_seqs=4, budget=16, num_steps=4)
    s.multi_step_with_prefill = True
    add(s, "a", 6, max_tokens=20)
    step(s)  # a's prompt; it samples its first token
    add(s, "b", 12, max_tokens=20, base=100)
    add(s, "c", 12, max_tokens=20, base=200)  # a's 1 + 24 prompt tokens: more than one step's 16
    out = step(s)
    assert rows(out, "id", "counts", "steps") == [("a", 1, 1), ("b", 12, 1), ("c", 3, 1)]
    assert (out.num_steps, out.with_prefill) == (1, False)
    out = step(s)  # the burst's rest fits: 2 decodes + c's 9
    assert rows(out, "id", "counts", "steps") == [("a", 1, 5), ("b", 1, 5), ("c", 9, 1)]
    assert (out.num_steps, out.with_prefill) == (4, True)
    s.pages.check_invariants()


def test_multi_step_with_prefill_decodes_on_while_the_waiting_prompts_do_not_fit_in_the_pool():
    s = make(num_pages=6, page_size=4, max_seqs=4, budget=16, num_steps=4)  # 5 usable pages
    s.multi_step_with_prefill = True
    a = add(s, "a", 6, max_tokens=20)
    step(s)  # a holds 2 pages
    add(s, "b", 40, max_tokens=4, base=100)  # its first chunk, 15 tokens, needs 4 pages: 3 are free
    out = step(s)
    assert rows(out, "id", "counts", "steps") == [("a", 1, 5)] and out.num_steps == 4
    assert len(s.waiting) == 1 and a.num_computed_tokens == 11
    s.pages.check_invariants()


def test_multi_step_decode_falls_back_to_one_step_when_pages_run_short():
    s = make(num_pages=3, page_size=4, budget=16, num_steps=4)  # 2 usable pages: 8 tokens of K/V
    a = add(s, "a", 5, max_tokens=10)
    step(s)  # prefill: both pages, one output token
    assert rows(step(s), "starts", "steps") == [(5, 1)]  # 5 + 4 > 8
    assert rows(step(s), "starts", "steps") == [(6, 1)]
    assert a.num_computed_tokens == 7 and len(s.pages.pages_of("a")) == 2 and s.num_preemptions == 0


def test_single_steps_while_a_row_needs_each_token_on_the_host_or_a_request_could_join():
    s = make(num_steps=4, max_seqs=2)
    add(s, "a", 2, max_tokens=8)
    s.add_request(Request("pen", [1, 2], SamplingParams(max_tokens=8, repetition_penalty=1.2)))
    step(s)
    assert step(s).num_steps == 1  # "pen" reads its tokens on the host
    s.finish(s.running[1], RequestStatus.FINISHED_ABORTED)
    s.add_request(Request("min", [1, 2], SamplingParams(max_tokens=8, min_tokens=3)))
    step(s)
    assert [step(s).num_steps for _ in range(2)] == [1, 1]  # "min" bans EOS for its next token
    add(s, "waiting", 3)  # max_seqs=2 is full, so "waiting" could not join anyway
    assert step(s).num_steps == 4
    s.finish(s.running[0], RequestStatus.FINISHED_ABORTED)
    out = step(s)  # room for "waiting": it is admitted now
    assert out.num_steps == 1 and out.requests[-1].request_id == "waiting"


def test_forked_request_computes_the_prompt_once_and_children_join_after_the_fork_step():
    s = make(num_pages=16, page_size=4, max_seqs=4, budget=8)
    a, b, c = add_forked(s, "a", 10, n=3)
    assert plan(step(s)) == [("a-0", 0, 8)]
    assert s.num_reserved == 2 and s.running == [a]
    out = step(s)  # the last chunk samples: b and c fork from it, sampling in rows 1 and 2
    assert plan(out) == [("a-0", 8, 2)]
    assert [(f.row, f.child) for f in out.forks] == [(0, b), (0, c)]
    sampler_rows, reqs, steps = out.sampling_plan()
    assert (sampler_rows.tolist(), reqs, steps.tolist()) == ([0, 1, 2], [a, b, c], [1, 1, 1])
    assert s.running == [a, b, c] and s.num_reserved == 0
    assert s.pages.pages_of("a-1") == s.pages.pages_of("a-0") == [1, 2, 3]
    assert (b.num_computed_tokens, b.num_pending, b.output_token_ids) == (10, 0, [7])
    out = step(s)  # each writes token 10 into shared page 3: the first two get copies
    assert plan(out) == [("a-0", 10, 1), ("a-1", 10, 1), ("a-2", 10, 1)]
    assert [(cp.request_id, cp.src, cp.dst) for cp in out.copies] == [("a-0", 3, 4), ("a-1", 3, 5)]
    assert [s.pages.pages_of(r.request_id)[2] for r in (a, b, c)] == [4, 5, 3]
    s.pages.check_invariants()


def test_admission_reserves_sequence_slots_for_pending_forks():
    s = make(max_seqs=4, budget=64)
    add_forked(s, "a", 3, n=3)
    add(s, "b", 3)
    add(s, "c", 3)
    out = step(s)  # a and its 2 forks take 3 of 4 sequences: b joins, c waits
    assert plan(out) == [("a-0", 0, 3), ("b", 0, 3)] and len(out.forks) == 2
    assert [r.request_id for r in s.running] == ["a-0", "b", "a-1", "a-2"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_preempted_parent_before_its_fork_releases_the_reservation():
    s = make(num_pages=5, page_size=4, max_seqs=4, budget=4, caching=False)
    add(s, "x", 4, max_tokens=8, base=100)
    step(s)
    kids = add_forked(s, "a", 8, n=2, max_tokens=2)
    step(s)  # x decodes (page 2), a's first chunk (page 3)
    assert s.num_reserved == 1
    while s.num_unfinished:
        step(s)
        s.pages.check_invariants()
        assert s.num_reserved == sum(len(r.forks) for r in s.running)
    assert s.num_preemptions > 0
    assert [len(k.output_token_ids) for k in kids] == [2, 2] and s.pages.usage == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "abort", "step", "step"]), st.integers(1, 30),
                          st.integers(1, 6)), max_size=60),
       st.booleans(), st.sampled_from([1, 3]))
def test_random_add_abort_step_keeps_page_invariants(ops, caching, num_steps):
    s = make(num_pages=12, page_size=4, max_seqs=3, budget=16, caching=caching, num_steps=num_steps)
    reqs = []
    for i, (op, n, k) in enumerate(ops):
        if op == "add" and n < 40:
            reqs.append(add(s, f"r{i}", n, max_tokens=k, base=(n % 3) * 100))  # repeated prefixes
        elif op == "fork" and n < 40:
            reqs += add_forked(s, f"r{i}", n, n=1 + k % 3, max_tokens=k, base=(n % 3) * 100)
        elif op == "abort" and reqs:
            victim = reqs[n % len(reqs)]
            if not victim.finished:
                s.finish(victim, RequestStatus.FINISHED_ABORTED)
        else:
            step(s)
        s.pages.check_invariants()
        assert all(r.status is RequestStatus.RUNNING for r in s.running)
        assert len(s.running) + s.num_reserved <= 3
        assert s.num_reserved == sum(len(r.forks) for r in s.running)
    for _ in range(400):
        if not s.num_unfinished:
            break
        step(s)
        s.pages.check_invariants()
    assert s.num_unfinished == 0
    assert s.pages.usage == 0.0
    for r in reqs:
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.sampling_params.max_tokens


def test_a_step_that_forks_is_never_a_multi_step_decode():
    # The parent's last prompt token is a one-token chunk; had it decoded 2 more sub-steps, its children would have
    # inherited 19 computed tokens for 18 known ones and waited forever (hypothesis found it).
    s = make(num_pages=12, page_size=4, max_seqs=3, budget=16, caching=False, num_steps=3)
    parent, *children = add_forked(s, "r0", 17, n=3, max_tokens=2)
    assert plan(step(s)) == [("r0-0", 0, 16)]
    out = step(s)
    assert (out.num_steps, plan(out), [f.child for f in out.forks]) == (1, [("r0-0", 16, 1)], children)
    assert [(c.num_computed_tokens, c.num_tokens) for c in children] == [(17, 18), (17, 18)]
    for _ in range(4):
        step(s)
    assert s.num_unfinished == 0
    assert [len(r.output_token_ids) for r in (parent, *children)] == [2, 2, 2]


def _lagged_step(s, in_flight):
    """An async-scheduling step: plans the next step, then the previous one's sampled ids (token 7) arrive."""
    out = s.schedule()
    if in_flight is not None:
        _, reqs, steps = in_flight.sampling_plan()
        step_ids = {id(req): [7] * n for req, n in zip(reqs, steps.tolist())}
        for req in in_flight.requests + [f.child for f in in_flight.forks]:
            if id(req) in step_ids and not req.finished:
                req.append_outputs(step_ids.pop(id(req)))
                if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                    s.finish(req, RequestStatus.FINISHED_LENGTH)
    return out


@pytest.mark.parametrize("num_steps", [1, 4])
@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "abort", "step", "step", "step"]), st.integers(1, 30),
                          st.integers(1, 20)), max_size=60))
def test_steady_decode_plans_what_the_general_pass_plans(num_steps, ops):
    """The array-planned steady decode (single or multi-step) gives the same rows, sub-steps, pages and request
    state as the general pass, under async scheduling's pending tokens, finishes, aborts, forks and page
    shortage."""
    fast = make(num_pages=14, page_size=4, max_seqs=4, budget=16, num_steps=num_steps)
    slow = make(num_pages=14, page_size=4, max_seqs=4, budget=16, num_steps=num_steps)
    slow.steady.build = lambda running, pages: False
    reqs = {id(fast): [], id(slow): []}
    flights = {id(fast): None, id(slow): None}
    for i, (op, n, k) in enumerate(ops + [("step", 0, 0)] * 300):
        for s in (fast, slow):
            if op == "add" and n < 40:
                reqs[id(s)].append(add(s, f"r{i}", n, max_tokens=k, base=(n % 3) * 100))
            elif op == "fork" and n < 40:
                reqs[id(s)] += add_forked(s, f"r{i}", n, n=1 + k % 2, max_tokens=k, base=(n % 3) * 100)
            elif op == "abort" and reqs[id(s)]:
                victim = reqs[id(s)][n % len(reqs[id(s)])]
                if not victim.finished:
                    s.finish(victim, RequestStatus.FINISHED_ABORTED)
            elif op == "step":
                flights[id(s)] = _lagged_step(s, flights[id(s)])
        a, b = flights[id(fast)], flights[id(slow)]
        if op == "step":
            fields = ("id", "starts", "counts", "samples", "steps", "num_pages")
            assert rows(a, *fields) == rows(b, *fields)
            assert (a.num_steps, len(a.preempted), a.copies) == (b.num_steps, len(b.preempted), b.copies)
        assert fast.pages.req_pages == slow.pages.req_pages
        assert [(r.num_computed_tokens, r.num_pending, r.output_token_ids, r.status) for r in reqs[id(fast)]] == [
            (r.num_computed_tokens, r.num_pending, r.output_token_ids, r.status) for r in reqs[id(slow)]]
        fast.pages.check_invariants()
        if op == "step" and not fast.num_unfinished:
            break
    assert not slow.num_unfinished


def test_steady_decode_is_taken_for_an_unchanged_running_list():
    s = make(num_pages=64, page_size=4, max_seqs=2, budget=16, num_steps=4)
    a, b = add(s, "a", 5, max_tokens=20), add(s, "b", 3, max_tokens=6)
    flight = _lagged_step(s, None)  # prefills
    flight = _lagged_step(s, flight)  # the first decode: the arrays are built from the running list
    assert s.steady.valid and rows(flight, "starts", "steps") == [(5, 4), (3, 4)]
    flight = _lagged_step(s, flight)  # planned over the arrays: b has 1 token left to plan (6 - 1 - 4)
    assert s.steady.valid and rows(flight, "starts", "steps") == [(9, 4), (7, 1)]
    assert (a.num_pending, b.num_pending) == (4, 1) and len(s.pages.pages_of("a")) == 4  # after step 2's ids
    flight = _lagged_step(s, flight)  # b's pending token reaches max_tokens: a alone; then b's last id arrives
    assert [r.request_id for r in flight.requests] == ["a"] and b.finished and not s.steady.valid
    _lagged_step(s, flight)  # rebuilt from the running list without b
    assert s.steady.valid and len(s.running) == 1
    s.pages.check_invariants()


def test_single_step_decodes_are_planned_over_the_arrays_unless_a_request_needs_the_host():
    s = make(num_pages=64, page_size=4, max_seqs=3, budget=16, num_steps=1)
    a, b = add(s, "a", 5, max_tokens=20), add(s, "b", 3, max_tokens=3)
    flight = _lagged_step(s, None)  # prefills: general pass
    assert not s.steady.valid
    flight = _lagged_step(s, flight)  # every running request decodes: the arrays are built and plan it
    assert s.steady.valid and rows(flight, "starts", "steps") == [(5, 1), (3, 1)]
    flight = _lagged_step(s, flight)
    assert s.steady.valid and rows(flight, "starts", "steps") == [(6, 1), (4, 1)] and flight.num_steps == 1
    flight = _lagged_step(s, flight)  # b's pending token reaches max_tokens: a alone; then b finishes
    assert [r.request_id for r in flight.requests] == ["a"] and b.finished and not s.steady.valid
    c = Request("c", list(range(4)), SamplingParams(max_tokens=8, repetition_penalty=1.2))
    s.add_request(c)
    for _ in range(4):  # c's prefill, then decodes beside a request whose penalties need the host: general pass
        flight = _lagged_step(s, flight)
        assert not s.steady.valid
    s.pages.check_invariants()
