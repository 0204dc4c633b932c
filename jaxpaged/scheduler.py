"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1's single scheduling model)."""

import collections
import logging

from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request, RequestStatus
from jaxpaged.scheduler_output import Fork, SchedulerOutput
from jaxpaged.steady_decode import SteadyDecode

logger = logging.getLogger(__name__)


class Scheduler:
    """Spends one token budget per step over running requests (decodes and unfinished prefills), then waiting ones.

    When the page manager cannot grow a running request, the most recently admitted running request is preempted:
    its pages are freed, its progress reset, and it goes back to the head of the waiting queue.

    With `num_scheduler_steps` > 1, a step in which every running request decodes and no waiting request could
    be admitted is a multi-step decode: each request gets pages for, and is planned to sample, up to that many
    tokens (fewer near max_tokens or max_model_len). Requests with penalties, beams or min_tokens ahead need each
    token on the host before the next, so their presence keeps steps single. With `multi_step_with_prefill`, a
    step that also admits or continues prefills is one too (`SchedulerOutput.with_prefill`): the prefill chunks
    and each decode's next token share a forward pass, after which the decodes run up to `num_scheduler_steps`
    more tokens, so that arrivals do not cut every running request down to one token per step; while a burst's
    prefills exceed one step's token budget, its steps stay single (`_prefills_fit`).

    A decode of the same running list as the previous step (nothing admitted, finished or preempted in between;
    every request decoding with no host look between its tokens), single or multi-step, is planned over arrays kept
    between steps (`SteadyDecode`), not per request; the plans are the same.

    A request with `forks` (the other children of an `n > 1` request) computes the prompt alone; the step that
    samples its first token forks them (`Fork`): they share its pages and join the running list after that step.
    Its admission reserves their sequence slots under `max_num_seqs`.
    """

    def __init__(self, page_manager: PageManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_scheduler_steps: int = 1, multi_step_ready=lambda: True,
                 multi_step_with_prefill: bool = False):
        self.pages = page_manager
        self.num_scheduler_steps = num_scheduler_steps
        self.multi_step_with_prefill = multi_step_with_prefill
        self.multi_step_ready = multi_step_ready  # () -> bool: False while the multi-step programs compile
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_reserved = 0  # pending forks of running requests: sequence slots they will take
        self._forks: list[Fork] = []  # forks of the step being scheduled
        self.steady = SteadyDecode(page_manager.page_size)

    def add_request(self, req: Request) -> None:
        """Queues `req` (and the children it forks) after the waiting ones."""
        for r in (req, *req.forks):
            r.cap_outputs(self.max_model_len)
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Picks this step's work and marks it computed (its K/V are written by the step about to run).

        With async scheduling a step is scheduled before the previous one's tokens reach the host: a request whose
        pending tokens already reach max_tokens or max_model_len is left out until they arrive and it finishes.
        """
        counted = None  # `_multi_step_count()`, computed at most once per step
        if self._steady_may_apply():
            steady, k = self.steady, self.num_scheduler_steps
            if not steady.valid:
                counted = self._multi_step_count()  # kept for the general pass below
                # single steps: `counted` is (1, False) without a look at the requests, so they are checked here
                if (counted == (k, False)) if k > 1 else (self._running_needs() == (False, False)):
                    steady.build(self.running, self.pages)
            planned = steady.schedule(self.running, k, self.pages) if steady.valid else None
            if planned is not None:
                planned.copies = self.pages.take_copies()
                return planned
        self.steady.invalidate()
        budget = self.max_num_batched_tokens
        scheduled: list[tuple] = []  # SchedulerOutput.from_rows's rows
        preempted: list[Request] = []
        running, allocate = self.running, self.pages.allocate
        multi, with_prefill = counted or self._multi_step_count()
        decode_steps = multi + with_prefill  # the forward pass's token first, with prefills
        i = 0
        while i < len(running) and budget > 0:  # one pass per running request per step: kept to plain arithmetic
            req = running[i]
            pending = req.num_pending
            num_outputs = len(req.output_token_ids) + pending
            num_tokens = len(req.prompt_token_ids) + num_outputs
            room = req.max_outputs - num_outputs  # tokens it may still be planned (max_tokens, max_model_len)
            if pending and room <= 0:  # its pending tokens reach a limit: wait for them (it then finishes)
                i += 1
                continue
            num_new = min(num_tokens - req.num_computed_tokens, budget)
            if num_new == 0:  # a beam waiting for the host to choose its next token
                i += 1
                continue
            steps = 1
            if multi > 1 and num_tokens - req.num_computed_tokens == 1:  # a decode: more tokens within the limits
                steps = min(decode_steps, room)
            if not (steps > 1 and allocate(req, steps)):
                steps = 1
                if not allocate(req, num_new) and not self._preempt_for(req, num_new, preempted):
                    continue  # `req` itself was preempted (it was the last running request)
            self._take(scheduled, req, num_new, num_tokens, steps)
            budget -= num_new
            i += 1
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        # One program length (the configured count) whatever the rows' own counts, so no other length compiles.
        num_steps = multi if multi > 1 and any(row[4] > 1 for row in scheduled) else 1
        with_prefill = with_prefill and num_steps > 1  # then the decode rows plan the forward's token too
        forks, self._forks = self._forks, []
        self.running.extend(f.child for f in forks)  # only now: they must not be scheduled in their fork step
        return SchedulerOutput.from_rows(scheduled, preempted=preempted, num_steps=num_steps, forks=forks,
                                         copies=self.pages.take_copies(), with_prefill=with_prefill)

    def _steady_may_apply(self) -> bool:
        """Whether this step may be a decode planned over `SteadyDecode`'s arrays: no request can be admitted
        and, with `num_scheduler_steps` > 1, multi-steps may run (the arrays then hold the running list's state,
        built in `schedule` when every running request decodes with no host look between its tokens, or kept from
        the previous step)."""
        running = self.running
        return (bool(running) and len(running) <= self.max_num_batched_tokens
                and not (self.waiting and len(running) < self.max_num_seqs)
                and (self.num_scheduler_steps == 1 or self.multi_step_ready()))

    def _multi_step_count(self) -> tuple[int, bool]:
        """(`num_scheduler_steps`, whether prefills may share the step) when this step can be a multi-step
        decode, else (1, False)."""
        if self.num_scheduler_steps == 1 or not self.running or not self.multi_step_ready():
            return 1, False
        prefilling = bool(self.waiting) and len(self.running) < self.max_num_seqs  # an admission may come
        if prefilling and not self.multi_step_with_prefill:
            return 1, False
        needs_host, prefill = self._running_needs()
        if needs_host or (prefill and not self.multi_step_with_prefill):
            return 1, False
        if (prefilling or prefill) and not self._prefills_fit():
            return 1, False
        return self.num_scheduler_steps, prefilling or prefill

    def _prefills_fit(self) -> bool:
        """Whether one step's token budget holds the running requests' rest and the prompts of the waiting
        requests that the free sequence slots and pages could admit. If not, a burst of prefills is under way and
        its steps stay single: decoding on through a burst lets the requests prefilled first finish first,
        leaving a tail of small decode batches (a queued burst ran 1.18x as long with every prefill step a
        multi-step, benchmarks/RESULTS.md, 2026-12-07 sixth session). Prefix-cache hits are not counted: they
        are only looked up on admission."""
        budget = self.max_num_batched_tokens
        for req in self.running:
            budget -= req.num_tokens - req.num_computed_tokens
        free = self.max_num_seqs - len(self.running) - self.num_reserved  # sequence slots
        pages = self.pages.num_free_pages
        for req in self.waiting:
            if budget < 0 or free <= 0:
                break
            pages -= -(-min(req.num_tokens, budget) // self.pages.page_size)  # its first chunk's pages
            if pages < 0:  # the pool cannot take it yet
                break
            budget -= req.num_tokens
            free -= 1 + len(req.forks)
        return budget >= 0

    def _running_needs(self) -> tuple[bool, bool]:
        """(whether a running request needs the host between its tokens: beams, penalties, forks or min_tokens
        ahead; whether a running request's prefill is still in progress)."""
        prefill = False
        for req in self.running:
            # NOTE: a request with forks ahead samples its first token here and forks after that token: in a
            # multi-step decode its own later sub-steps would be counted as its children's computed tokens.
            if (req.host_sync or req.forks
                    or req.sampling_params.min_tokens > len(req.output_token_ids) + req.num_pending):
                return True, False
            if req.num_computed_tokens != req.num_tokens - 1:
                prefill = True
        return False, prefill

    def _preempt_for(self, req: Request, num_new: int, preempted: list[Request]) -> bool:
        """Preempts the most recently admitted running requests until `req` gets its pages; False if `req`
        itself had to go."""
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
            if self.pages.allocate(req, num_new):
                return True

    def _fork(self, req: Request, row: int) -> None:
        """Forks `req`'s pending children after the chunk that samples its first token (scheduled in `row`)."""
        children, req.forks = req.forks, []
        self.num_reserved -= len(children)
        for child in children:
            if child.finished:  # aborted before its fork
                continue
            self.pages.fork(req, child)
            child.num_computed_tokens = req.num_computed_tokens
            child.num_pending = 1
            child.num_cached_tokens = req.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self._forks.append(Fork(row, child))

    def _take(self, scheduled: list[tuple], req: Request, num_new: int, num_tokens: int, steps: int = 1) -> None:
        """Schedules the chunk (and `steps - 1` decode sub-steps after it): marks it computed and its tokens
        pending, and forks `req`'s pending children if the chunk samples its first token."""
        start = req.num_computed_tokens
        samples = start + num_new == num_tokens
        req.num_computed_tokens = start + num_new + steps - 1
        req.num_pending += samples + steps - 1
        scheduled.append((req, start, num_new, samples, steps, len(self.pages.pages_of(req.request_id))))
        if req.forks and samples:
            self._fork(req, len(scheduled) - 1)

    def _admit_waiting(self, scheduled: list[tuple], budget: int) -> int:
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if len(self.running) + len(self._forks) + self.num_reserved + 1 + len(req.forks) > self.max_num_seqs:
                break
            hits = self.pages.find_cached_prefix(req)
            num_computed = len(hits) * self.pages.page_size
            num_tokens = req.num_tokens
            num_new = min(num_tokens - num_computed, budget)
            if not self.pages.allocate(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.num_reserved += len(req.forks)
            self._take(scheduled, req, num_new, num_tokens)
            budget -= num_new
        return budget

    def _preempt(self, req: Request) -> None:
        self.num_reserved -= len(req.forks)
        self.pages.free_request(req.request_id, req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.warning(
            "Preempted request %s (recompute of %d tokens); the KV pool is too small for this load: raise "
            "gpu_memory_utilization / kv_cache_memory_bytes or lower max_num_seqs.", req.request_id, req.num_tokens)

    def reset(self, req: Request) -> None:
        """Takes a request out of the queues and frees its pages, back to WAITING with nothing computed (the
        caller queues it again, or not)."""
        self.steady.invalidate()
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.num_reserved -= len(req.forks)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pages.free_request(req.request_id, req)
        req.status, req.num_computed_tokens, req.num_pending, req.forks = RequestStatus.WAITING, 0, 0, []

    def add_first(self, req: Request) -> None:
        """Queues a request ahead of every waiting one."""
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Ends a request (stop, length or abort), freeing its pages wherever it is."""
        self.steady.invalidate()
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.num_reserved -= len(req.forks)
            req.forks = []
        elif not req.finished and req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.pages.free_request(req.request_id, req)
