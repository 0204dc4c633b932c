"""PageManager bookkeeping with tiny pages: exact page ids, ref counts, prefix hits and eviction order."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams


def make_req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def admit(pm, req):
    hits = pm.find_cached_prefix(req)
    n = req.num_tokens - len(hits) * pm.page_size
    assert pm.allocate(req, n, hits)
    req.num_computed_tokens = req.num_tokens
    return hits


def test_allocates_lowest_free_pages_first_and_skips_null_page():
    pm = PageManager(num_pages=8, page_size=4)
    req = make_req("a", range(10))  # 3 pages
    admit(pm, req)
    assert pm.pages_of("a") == [1, 2, 3]
    assert pm.ref_counts[1:4] == [1, 1, 1]
    assert pm.num_free_pages == 4
    assert pm.usage == pytest.approx(3 / 7)


def test_prefix_hit_shares_full_pages_and_leaves_one_token_to_compute():
    pm = PageManager(num_pages=10, page_size=4)
    admit(pm, make_req("a", range(12)))  # pages 1,2,3 all full and hashed
    b = make_req("b", range(12))  # identical: hits capped at (12 - 1) // 4 = 2 pages
    hits = admit(pm, b)
    assert hits == [1, 2]
    assert pm.pages_of("b") == [1, 2, 4]
    assert pm.ref_counts[1:5] == [2, 2, 1, 1]
    assert pm.stats.queries == 24 and pm.stats.hits == 8
    c = make_req("c", list(range(4)) + [99] * 8)  # shares only the first page
    assert admit(pm, c) == [1]
    pm.check_invariants()


def test_freed_pages_stay_hittable_until_evicted_lru_tail_first():
    pm = PageManager(num_pages=6, page_size=2)
    admit(pm, make_req("a", [1, 2, 3, 4, 5, 6]))  # pages 1,2,3
    pm.free_request("a")
    # freed tail-first: 3, 2, 1 queue after the never-used 4, 5
    assert list(pm.free) == [4, 5, 3, 2, 1]
    b = make_req("b", [1, 2, 3, 4, 9])
    assert admit(pm, b) == [1, 2]  # revived from the free list
    assert pm.pages_of("b") == [1, 2, 4]
    assert list(pm.free) == [5, 3]
    # next allocation takes 5 then evicts 3 (hash of tokens [5, 6])
    admit(pm, make_req("c", [7, 7, 8, 8]))
    assert pm.pages_of("c") == [5, 3]
    assert len(pm.cached) == 4  # [1,2] [3,4] (page1,2) [7,7] [8,8] (5,3); [5,6] evicted
    d = make_req("d", [1, 2, 3, 4, 5, 6, 0])
    assert pm.find_cached_prefix(d) == [1, 2]
    pm.check_invariants()


def test_allocation_failure_changes_nothing():
    pm = PageManager(num_pages=4, page_size=4)
    admit(pm, make_req("a", range(8)))
    big = make_req("b", range(100, 120))
    assert not pm.allocate(big, 20)
    assert pm.pages_of("b") == [] and pm.num_free_pages == 1
    pm.check_invariants()


def test_prefix_caching_off_never_hits():
    pm = PageManager(num_pages=10, page_size=4, enable_prefix_caching=False)
    admit(pm, make_req("a", range(12)))
    assert admit(pm, make_req("b", range(12))) == []
    assert pm.cached == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5), st.integers(1, 9)),
                max_size=40))
def test_random_add_grow_free_keeps_invariants(ops):
    pm = PageManager(num_pages=12, page_size=2)
    live: dict[str, Request] = {}
    for i, (op, pick, n) in enumerate(ops):
        if op == "add":
            req = make_req(f"r{i}", [pick] * n + [i])  # shared-looking prefixes to exercise hits
            hits = pm.find_cached_prefix(req)
            if pm.allocate(req, req.num_tokens - len(hits) * 2, hits):
                req.num_computed_tokens = req.num_tokens
                live[req.request_id] = req
        elif live:
            req = list(live.values())[pick % len(live)]
            if op == "grow":
                req.output_token_ids.append(n)
                if not pm.allocate(req, 1):
                    req.output_token_ids.pop()
                else:
                    req.num_computed_tokens += 1
            else:
                pm.free_request(req.request_id)
                del live[req.request_id]
        pm.check_invariants()
    for rid in list(live):
        pm.free_request(rid)
    pm.check_invariants()
    assert pm.usage == 0.0
