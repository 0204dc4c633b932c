"""Paged KV pool bookkeeping: ref-counted pages, LRU free list, automatic prefix caching (as vLLM v1), forks with
copy-on-write (as vLLM v0's block manager)."""

import collections
import dataclasses

import numpy as np

from jaxpaged.request import Request

NULL_PAGE = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PageCopy:
    """A copy-on-write: column `index` of the request's page table moves from shared page `src` to its own `dst`,
    which the device fills with `src`'s contents before the step writes into it."""

    request_id: str
    index: int
    src: int
    dst: int


@dataclasses.dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and those found (vLLM's prefix_cache_queries / hits)."""

    queries: int = 0
    hits: int = 0


class PageManager:
    """Owns page ids 1..num_pages-1 (page 0 is the null page that padding points at).

    A full page gets a hash chained from its predecessor's hash and its token ids; a later request whose prefix
    hashes match reuses those pages (ref count + 1). Prompt pages enter the cache as they are computed, generated
    ones when their request leaves (`free_request(id, req)`: finished or preempted), not as they fill (as vLLM
    does): hashing in every decode step would be host work on the decode path, and generated text is hit by later
    requests (a chat's next turn, a preempted request's recompute), which arrive after it left. Freed pages go to
    the tail of an LRU free list but keep their hash, so they can still be hit; they are evicted lazily, when the
    head of the free list is handed out again. Pages of a freed request are queued tail-first, so a prefix
    outlives its suffix.

    `fork` lets a child share every page of its parent, the partly filled last page included. Whoever first writes
    into a shared page (ref count > 1) gets a copy of it (`PageCopy`, collected in `copies` until the runner takes
    them for the step); the last holder writes in place.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        self.cached: dict[int, int] = {}  # page hash -> page id
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
        self.req_pages: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # request id -> its leading pages already entered in `cached`
        self.stats = PrefixCacheStats()
        self.copies: list[PageCopy] = []  # copy-on-writes of the steps being scheduled, taken by the runner
        self._num_refs = 0  # sum of ref_counts, kept as they change (a metric read every server step)

    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by requests (vLLM's kv_cache_usage_perc, 0..1)."""
        return 1.0 - len(self.free) / (self.num_pages - 1)

    @property
    def num_shared_refs(self) -> int:
        """Page references beyond the first of each page: pages that sharing (prefix hits, forks) saves now."""
        return self._num_refs - (self.num_pages - 1 - len(self.free))

    def pages_of(self, request_id: str) -> list[int]:
        return self.req_pages.get(request_id, [])

    def fork(self, parent: Request, child: Request) -> None:
        """Gives `child` (no pages yet) all of `parent`'s pages, shared (ref count + 1 each)."""
        pages = self.req_pages.get(parent.request_id, [])
        for page in pages:
            self.ref_counts[page] += 1
        self._num_refs += len(pages)
        self.req_pages[child.request_id] = list(pages)
        self._num_hashed[child.request_id] = self._num_hashed.get(parent.request_id, 0)
        child.page_hashes = list(parent.page_hashes)

    def reassign(self, pairs: list[tuple[Request, Request]]) -> None:
        """For each (target, source): target drops its pages and shares source's instead (beam search moving a
        beam onto another's continuation). Every source is read before any target changes."""
        new = [(t, list(self.pages_of(s.request_id)), self._num_hashed.get(s.request_id, 0), list(s.page_hashes))
               for t, s in pairs]
        for _, pages, _, _ in new:
            for page in pages:
                self.ref_counts[page] += 1
            self._num_refs += len(pages)
        for target, pages, num_hashed, hashes in new:
            self.free_request(target.request_id)
            self.req_pages[target.request_id] = pages
            self._num_hashed[target.request_id] = num_hashed
            target.page_hashes = hashes

    def take_copies(self) -> list[PageCopy]:
        """The copy-on-writes collected since the last call."""
        copies, self.copies = self.copies, []
        return copies

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Page ids of the longest cached prefix of `req`, leaving at least one token to compute (none for a
        request that asks for prompt logprobs: every prompt position must be computed)."""
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return []
        max_pages = (req.num_tokens - 1) // self.page_size
        self._ensure_hashes(req, max_pages)
        hits = []
        for page_hash in req.page_hashes[:max_pages]:
            page = self.cached.get(page_hash)
            if page is None:
                break
            hits.append(page)
        self.stats.queries += req.num_tokens
        self.stats.hits += len(hits) * self.page_size
        return hits

    def allocate(self, req: Request, num_new_tokens: int, cached_pages: list[int] = ()) -> bool:
        """Gives `req` pages for `num_new_tokens` more tokens after its computed (and `cached_pages`) ones.

        Returns False and changes nothing when the free list cannot cover it.
        """
        size = self.page_size
        pages = self.req_pages.get(req.request_id)
        shared = []
        if pages is not None and not cached_pages:  # a running request grows
            total = req.num_computed_tokens + num_new_tokens
            if self._num_refs > self.num_pages - 1 - len(self.free):  # some page is shared: copy-on-write ahead?
                shared = [i for i in range(req.num_computed_tokens // size, min(len(pages), -(-total // size)))
                          if self.ref_counts[pages[i]] > 1]
            if not shared:  # the common decode step: its own pages, and new ones past them
                num_needed = -(-total // size) - len(pages)
                if num_needed > len(self.free):
                    return False
                pages += self._take_free_pages(num_needed)
                if req.num_computed_tokens < len(req.prompt_token_ids):  # a prompt chunk: its full pages now
                    self._cache_full_pages(req, pages, total // size)
                return True
        pages = self.req_pages.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(cached_pages) * size
        total = num_computed + num_new_tokens
        num_needed = -(-total // size) - len(pages) - len(cached_pages)
        num_revived = sum(1 for p in cached_pages if self.ref_counts[p] == 0)
        if max(num_needed, 0) + len(shared) > len(self.free) - num_revived:
            if not pages:
                del self.req_pages[req.request_id]
            return False
        for i in shared:
            self._copy_on_write(req.request_id, pages, i)
        for page in cached_pages:
            if self.ref_counts[page] == 0:
                del self.free[page]
            self.ref_counts[page] += 1
        self._num_refs += len(cached_pages)
        pages.extend(cached_pages)
        pages += self._take_free_pages(max(num_needed, 0))
        self._cache_full_pages(req, pages, total // self.page_size)
        return True

    def extend(self, page_lists: list[list[int]], counts) -> bool:
        """Appends `counts[i]` free pages to `page_lists[i]` (running requests' own page lists, whose next writes go
        into pages they alone hold), in order; False, changing nothing, when the free list cannot cover them all."""
        total = int(counts.sum())
        if total > len(self.free):
            return False
        taken, at = self._take_free_pages(total), 0
        rows = np.flatnonzero(counts)
        for i, n in zip(rows.tolist(), counts[rows].tolist()):
            page_lists[i] += taken[at:at + n]
            at += n
        return True

    def _copy_on_write(self, request_id: str, pages: list[int], index: int) -> None:
        src, (dst,) = pages[index], self._take_free_pages(1)
        self.ref_counts[src] -= 1
        self._num_refs -= 1
        pages[index] = dst
        self.copies.append(PageCopy(request_id, index, src, dst))

    def free_request(self, request_id: str, req: Request | None = None) -> None:
        """Releases a finished or preempted request's pages (tail first into the LRU list). With `req` (the
        request leaving), its full pages whose tokens are all computed and known enter the prefix cache first."""
        if req is not None:
            pages = self.req_pages.get(request_id)
            if pages:
                self._cache_full_pages(req, pages, req.num_computed_tokens // self.page_size)
        self._num_hashed.pop(request_id, None)
        pages = self.req_pages.pop(request_id, [])
        self._num_refs -= len(pages)
        for page in reversed(pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free[page] = None

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (pages in use keep their data)."""
        self.cached.clear()
        self.page_hash = [None] * self.num_pages
        self._num_hashed = dict.fromkeys(self._num_hashed, 0)

    def _take_free_pages(self, n: int) -> list[int]:
        """The first `n` pages of the free list (the least recently freed), each now held once; a page still in
        the prefix cache leaves it (lazy eviction)."""
        free, page_hashes, refs = self.free, self.page_hash, self.ref_counts
        pages = [free.popitem(last=False)[0] for _ in range(n)]
        for page in pages:
            page_hash = page_hashes[page]
            if page_hash is not None:
                if self.cached.get(page_hash) == page:
                    del self.cached[page_hash]
                page_hashes[page] = None
            refs[page] = 1
        self._num_refs += n
        return pages

    def _cache_full_pages(self, req: Request, pages: list[int], num_full: int) -> None:
        """Enters the request's first `num_full` pages in the prefix cache, those not entered yet whose tokens are
        all known (a page holding a pending token is entered once its id arrives)."""
        if not self.enable_prefix_caching:
            return
        start = self._num_hashed.get(req.request_id, 0)
        num_full = min(num_full, req.num_known_tokens // self.page_size)
        if num_full <= start:
            return
        self._ensure_hashes(req, num_full)
        num_full = min(num_full, len(req.page_hashes))
        for i in range(start, num_full):
            page_hash = req.page_hashes[i]
            if page_hash not in self.cached and self.page_hash[pages[i]] is None:
                self.cached[page_hash] = pages[i]
                self.page_hash[pages[i]] = page_hash
        self._num_hashed[req.request_id] = max(start, num_full)

    def _ensure_hashes(self, req: Request, num_pages: int) -> None:
        """Hashes the request's first `num_pages` pages (those whose tokens are all known), each chained from its
        predecessor's hash."""
        size, hashes = self.page_size, req.page_hashes
        have = len(hashes)
        want = min(num_pages, req.num_known_tokens // size)
        if want <= have:
            return
        tokens = iter(req.token_ids(have * size, want * size))
        parent = hashes[-1] if have else None
        for page_tokens in zip(*[tokens] * size):  # the pages' token tuples, made in C
            parent = hash((parent, page_tokens))
            hashes.append(parent)

    def check_invariants(self) -> None:
        """Asserts the pool's bookkeeping is consistent (used by tests)."""
        owners = collections.Counter(p for pages in self.req_pages.values() for p in pages)
        assert NULL_PAGE not in owners and NULL_PAGE not in self.free
        for page in range(1, self.num_pages):
            assert self.ref_counts[page] == owners[page], (page, self.ref_counts[page], owners[page])
            assert (page in self.free) == (self.ref_counts[page] == 0), page
        for pages in self.req_pages.values():
            assert len(set(pages)) == len(pages), "a page appears twice in one request"
        assert self._num_refs == sum(self.ref_counts)
        used = sum(1 for page in range(1, self.num_pages) if self.ref_counts[page] > 0)
        assert used + len(self.free) == self.num_pages - 1
        for page_hash, page in self.cached.items():
            assert self.page_hash[page] == page_hash
