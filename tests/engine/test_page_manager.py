"""PageManager bookkeeping with tiny pages: exact page ids, ref counts, prefix hits and eviction order."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpaged.page_manager import PageCopy, PageManager
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


def test_generated_pages_enter_the_cache_when_their_request_leaves():
    pm = PageManager(num_pages=10, page_size=2)
    a = make_req("a", [1, 2, 3, 4])
    admit(pm, a)
    for token in (5, 6, 7):
        assert grow(pm, a, token)
    a.output_token_ids.append(8)  # sampled, its K/V not computed yet: page [7, 8] is not complete
    assert len(pm.cached) == 2  # the prompt's pages only, while a runs
    pm.free_request("a", a)
    assert len(pm.cached) == 3  # + [5, 6]
    b = make_req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(pm, b) == [1, 2, 3]
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


def fork(pm, parent, rid):
    child = make_req(rid, parent.prompt_token_ids)
    pm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    return child


def grow(pm, req, token=0):
    req.output_token_ids.append(token)
    ok = pm.allocate(req, 1)
    if ok:
        req.num_computed_tokens += 1
    else:
        req.output_token_ids.pop()
    return ok


def test_fork_shares_every_page_including_the_partial_last_one():
    pm = PageManager(num_pages=10, page_size=4)
    a = make_req("a", range(10))  # pages 1, 2 full, 3 holds 2 tokens
    admit(pm, a)
    b, c = fork(pm, a, "b"), fork(pm, a, "c")
    assert pm.pages_of("b") == pm.pages_of("c") == [1, 2, 3]
    assert pm.ref_counts[1:4] == [3, 3, 3]
    assert pm.num_free_pages == 6 and pm.num_shared_refs == 6
    assert b.page_hashes == c.page_hashes == a.page_hashes
    pm.check_invariants()


def test_first_write_into_a_shared_partial_page_copies_it_and_the_last_holder_writes_in_place():
    pm = PageManager(num_pages=10, page_size=4)
    a = make_req("a", range(10))
    admit(pm, a)
    b = fork(pm, a, "b")
    assert grow(pm, b)  # writes token 10 into page 3 (shared): b gets page 4, a copy of 3
    assert pm.pages_of("b") == [1, 2, 4] and pm.pages_of("a") == [1, 2, 3]
    assert pm.take_copies() == [PageCopy("b", 2, 3, 4)]
    assert pm.ref_counts[1:5] == [2, 2, 1, 1]
    assert grow(pm, a)  # page 3 is a's alone now: written in place
    assert pm.take_copies() == [] and pm.pages_of("a") == [1, 2, 3]
    assert grow(pm, b) and pm.take_copies() == []  # b's own page 4
    pm.check_invariants()


def test_fork_on_a_page_boundary_copies_nothing():
    pm = PageManager(num_pages=10, page_size=4)
    a = make_req("a", range(8))  # two full pages
    admit(pm, a)
    b = fork(pm, a, "b")
    assert grow(pm, a) and grow(pm, b)
    assert pm.take_copies() == []
    assert pm.pages_of("a") == [1, 2, 3] and pm.pages_of("b") == [1, 2, 4]


def test_freeing_a_fork_frees_only_its_own_pages():
    pm = PageManager(num_pages=10, page_size=4)
    a = make_req("a", range(6))
    admit(pm, a)
    b = fork(pm, a, "b")
    for _ in range(4):
        assert grow(pm, b)  # b: [1, 3 (copy of 2), 4]
    assert pm.pages_of("b") == [1, 3, 4]
    pm.free_request("b")
    assert pm.pages_of("a") == [1, 2] and pm.ref_counts[1:5] == [1, 1, 0, 0]
    assert list(pm.free)[-2:] == [4, 3]  # tail first
    pm.free_request("a")
    pm.check_invariants()
    assert pm.usage == 0.0


def test_copy_on_write_that_cannot_get_a_page_changes_nothing():
    pm = PageManager(num_pages=4, page_size=4)
    a = make_req("a", range(10))  # all 3 usable pages
    admit(pm, a)
    b = fork(pm, a, "b")
    assert not grow(pm, b)
    assert pm.pages_of("b") == [1, 2, 3] and pm.take_copies() == [] and pm.ref_counts[3] == 2
    pm.check_invariants()


class SimulatedPool:
    """Page contents as the device would hold them: copies applied, then each computed token written."""

    def __init__(self, pm):
        self.pm, self.data = pm, {}

    def write(self, req, start):
        size = self.pm.page_size
        for c in self.pm.take_copies():
            self.data[c.dst] = list(self.data[c.src])
        pages = self.pm.pages_of(req.request_id)
        for pos in range(start, req.num_computed_tokens):
            self.data.setdefault(pages[pos // size], [None] * size)[pos % size] = req.token_ids(pos, pos + 1)[0]

    def check(self, live):
        """Every live request reads its own tokens back through its pages."""
        size = self.pm.page_size
        for req in live.values():
            pages = self.pm.pages_of(req.request_id)
            seen = [self.data[pages[pos // size]][pos % size] for pos in range(req.num_computed_tokens)]
            assert seen == req.token_ids(0, req.num_computed_tokens), req.request_id


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "grow", "free", "fork"]), st.integers(0, 5),
                          st.integers(1, 9)), max_size=40))
def test_random_add_grow_fork_free_keeps_invariants_and_contents(ops):
    pm = PageManager(num_pages=12, page_size=2)
    pool = SimulatedPool(pm)
    live: dict[str, Request] = {}
    for i, (op, pick, n) in enumerate(ops):
        if op == "add":
            req = make_req(f"r{i}", [pick] * n + [i])  # shared-looking prefixes to exercise hits
            hits = pm.find_cached_prefix(req)
            if pm.allocate(req, req.num_tokens - len(hits) * 2, hits):
                req.num_computed_tokens = req.num_tokens
                live[req.request_id] = req
                pool.write(req, len(hits) * 2)
        elif live:
            req = list(live.values())[pick % len(live)]
            if op == "grow":
                if grow(pm, req, n):
                    pool.write(req, req.num_computed_tokens - 1)
            elif op == "fork":
                child = fork(pm, req, f"r{i}")
                child.output_token_ids = list(req.output_token_ids)
                live[child.request_id] = child
            else:
                pm.free_request(req.request_id, req)  # its generated full pages enter the cache
                del live[req.request_id]
        pm.check_invariants()
        pool.check(live)
    for rid in list(live):
        pm.free_request(rid)
    pm.check_invariants()
    assert pm.usage == 0.0
