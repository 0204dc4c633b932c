"""Scheduler behaviour without a model: budgets, chunked prefill, preemption order and resumption."""

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request, RequestStatus
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler


def make(num_pages=64, page_size=4, max_seqs=4, budget=16, caching=True):
    return Scheduler(PageManager(num_pages, page_size, caching), max_seqs, budget, max_model_len=1024)


def add(s, rid, prompt_len, max_tokens=4, base=0):
    req = Request(rid, [base + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))
    s.add_request(req)
    return req


def step(s):
    """Schedules, 'computes', samples token 7 for finished chunks and ends requests at max_tokens."""
    out = s.schedule()
    for sr in out.scheduled:
        if sr.samples:
            sr.request.append_output(7)
            if len(sr.request.output_token_ids) >= sr.request.sampling_params.max_tokens:
                s.finish(sr.request, RequestStatus.FINISHED_LENGTH)
    return out


def plan(out):
    return [(sr.request.request_id, sr.num_computed_tokens, sr.num_new_tokens) for sr in out.scheduled]


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
    assert [sr.request.request_id for sr in out.scheduled] == ["a", "b"]
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


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step"]), st.integers(1, 30),
                          st.integers(1, 6)), max_size=60),
       st.booleans())
def test_random_add_abort_step_keeps_page_invariants(ops, caching):
    s = make(num_pages=12, page_size=4, max_seqs=3, budget=16, caching=caching)
    reqs = []
    for i, (op, n, k) in enumerate(ops):
        if op == "add" and n < 40:
            reqs.append(add(s, f"r{i}", n, max_tokens=k, base=(n % 3) * 100))  # repeated prefixes
        elif op == "abort" and reqs:
            victim = reqs[n % len(reqs)]
            if not victim.finished:
                s.finish(victim, RequestStatus.FINISHED_ABORTED)
        else:
            step(s)
        s.pages.check_invariants()
        assert all(r.status is RequestStatus.RUNNING for r in s.running)
        assert len(s.running) <= 3
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
