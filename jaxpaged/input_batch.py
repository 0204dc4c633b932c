"""The persistent input batch (as vLLM v1's `InputBatch`): per-slot token ids and page tables, updated by diffs.

A running request owns one slot from admission until it finishes or is preempted. Its prompt is copied into the
slot's token row once; each output token is appended as it arrives; its page table is mirrored on the device and
only new pages are sent. Building a step is then a few vectorised NumPy gathers over the scheduled slots.
"""

import dataclasses
import itertools

import numpy as np

from jaxpaged.request import Request
from jaxpaged.scheduler_output import SchedulerOutput


@dataclasses.dataclass(slots=True)
class StepLayout:
    """A scheduled step as flat host arrays, padded to its (T, S) bucket.

    `token_ids` holds -(slot + 1) where the token is still pending on the device: the step reads it from the
    previous step's sampled ids (`slot_tokens[slot]`). Rows past the `num_seqs` sequences are padding for the
    forward pass; the first of them sample for the children forked in this step (`SchedulerOutput.forks`), from
    their parents' last hidden states.
    """

    token_ids: np.ndarray     # [T] int32
    cu_q_lens: np.ndarray     # [S + 1] int32
    kv_lens: np.ndarray       # [S] int32
    slots: np.ndarray         # [S] int32  slot of each sequence (padding and fork rows: the pad slot)
    num_seqs: int
    last_rows: np.ndarray     # [S] int32  token whose hidden state each row samples from
    row_slots: np.ndarray     # [S] int32  slot whose sampling parameters each row uses (fork rows: the child's)
    sample_slots: np.ndarray  # [S] int32  slot to store the sampled id in (pad slot: row does not sample)
    positions: np.ndarray     # [S] int32  index of the sampled token among the request's outputs


@dataclasses.dataclass(slots=True)
class ArrivedTokens:
    """The output ids a finished step gave its live requests: request i kept `counts[i]` ids, the first ones of
    row `rows[i]` of `ids` (a stop cuts the rest)."""

    requests: list[Request]
    rows: np.ndarray    # [R] int
    counts: np.ndarray  # [R] int
    ids: np.ndarray     # [S, K] int32  the step's sampled ids per sampler row and sub-step


class InputBatch:
    """Token rows [slots, max_model_len] and page-table bookkeeping of up to `num_slots` running requests.

    Slot `num_slots` is the padding slot: its device page-table row stays all null pages.
    """

    def __init__(self, num_slots: int, max_model_len: int, page_size: int):
        self.num_slots = num_slots
        self.pad_slot = num_slots
        self.page_size = page_size
        self.tokens = np.zeros((num_slots, max_model_len), np.int32)  # lazily touched by the OS: rows fill as used
        self.num_known = np.zeros(num_slots + 1, np.int32)
        self.num_prompt = np.zeros(num_slots + 1, np.int32)
        self.pages_sent = np.zeros(num_slots + 1, np.int64)  # page-table entries the device has, per slot
        self.slot_of: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def add(self, req: Request) -> int:
        """Gives `req` a slot and copies its known tokens there; returns the slot."""
        slot = self._free.pop()
        self.slot_of[req.request_id] = slot
        n_prompt, n = req.num_prompt_tokens, req.num_known_tokens
        self.tokens[slot, :n_prompt] = req.prompt_token_ids
        self.tokens[slot, n_prompt:n] = req.output_token_ids
        self.num_known[slot], self.num_prompt[slot] = n, n_prompt
        self.pages_sent[slot] = 0
        return slot

    def remove(self, request_id: str) -> None:
        """Frees the request's slot (finished, aborted or preempted); unknown ids are ignored."""
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def append_tokens(self, arrived: ArrivedTokens) -> None:
        """Records arrived output tokens in the requests' rows (requests without a slot are skipped)."""
        slots = self.slots(arrived.requests)  # [R]
        keep = slots >= 0
        slots, counts, rows = slots[keep], arrived.counts[keep], arrived.rows[keep]
        steps = np.arange(arrived.ids.shape[1])  # [K]
        taken = steps < counts[:, None]  # [R, K]
        cols = self.num_known[slots][:, None] + steps  # [R, K]
        self.tokens[np.broadcast_to(slots[:, None], taken.shape)[taken], cols[taken]] = arrived.ids[rows][taken]
        self.num_known[slots] += counts

    def rewrite(self, req: Request) -> None:
        """Copies a request's outputs into its row again and queues its whole page table to be sent (its outputs
        and pages were replaced: a beam moved onto another's continuation)."""
        slot = self.slot_of[req.request_id]
        n = req.num_known_tokens
        self.tokens[slot, req.num_prompt_tokens:n] = req.output_token_ids
        self.num_known[slot] = n
        self.pages_sent[slot] = 0

    def slots(self, requests: list[Request]) -> np.ndarray:
        """[R] int32 slot of each request, -1 for a request without one."""
        get = self.slot_of.get
        return np.fromiter((get(r.request_id, -1) for r in requests), np.int32, len(requests))

    def page_updates(self, sched: SchedulerOutput, slots: np.ndarray,
                     pages_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slots, columns, page ids) [U] int32 of page-table entries the device does not have yet: entries it had
        that a copy-on-write replaced, then pages new to a scheduled (in `slots`, from `self.slots`) or forked
        request. Only the rows whose page count grew are visited."""
        copied = [(slot, c.index, c.dst) for c in sched.copies
                  if (slot := self.slot_of.get(c.request_id)) is not None and c.index < self.pages_sent[slot]]
        requests, counts = sched.requests, sched.num_pages  # [R], [R]
        if sched.forks:
            children = [f.child for f in sched.forks]
            requests = requests + children
            slots = np.concatenate([slots, self.slots(children)])
            counts = np.concatenate([counts, [len(pages_of(c.request_id)) for c in children]])
        at = np.flatnonzero(counts > self.pages_sent[slots])  # [G] rows that got pages
        grown, sent, count = slots[at], self.pages_sent[slots[at]], counts[at]  # [G]
        self.pages_sent[grown] = count
        new = count - sent  # [G]
        total = int(new.sum())
        pages = itertools.chain.from_iterable(pages_of(requests[i].request_id)[a:b]
                                              for i, a, b in zip(at.tolist(), sent.tolist(), count.tolist()))
        entries = (np.repeat(grown, new), np.arange(total) + np.repeat(sent - (np.cumsum(new) - new), new),
                   np.fromiter(pages, np.int64, total))  # [N] each
        if not copied:
            return tuple(e.astype(np.int32) for e in entries)
        return tuple(np.concatenate([c, e]).astype(np.int32) for c, e in zip(zip(*copied), entries))

    def layout(self, sched: SchedulerOutput, slots: np.ndarray, num_tokens: int, num_seqs: int) -> StepLayout:
        """Flat token ids and per-sequence arrays of a step (`slots`: its rows' slots, from `self.slots`), padded
        to `num_tokens` x `num_seqs`."""
        n = len(sched.requests)
        start, count = sched.starts, sched.counts
        slot_col = np.full(num_seqs, self.pad_slot, np.int32)
        slot_col[:n] = slots
        cu = np.zeros(num_seqs + 1, np.int32)
        np.cumsum(count, out=cu[1:n + 1])
        total = int(cu[n])
        cu[n + 1:] = total
        kv_lens = np.zeros(num_seqs, np.int32)
        kv_lens[:n] = start + count
        seq = np.repeat(np.arange(n), count)  # [total]
        pos = np.arange(total, dtype=np.int32) - cu[seq] + start[seq]
        row = slots[seq]
        token_ids = np.zeros(num_tokens, np.int32)
        token_ids[:total] = np.where(pos < self.num_known[row], self.tokens[row, pos], -(row + 1))
        last_rows = np.maximum(cu[1:] - 1, 0)
        sample_slots = np.full(num_seqs, self.pad_slot, np.int32)
        sample_slots[:n] = np.where(sched.samples, slots, self.pad_slot)
        positions = np.zeros(num_seqs, np.int32)
        positions[:n] = kv_lens[:n] - self.num_prompt[slots]
        row_slots = slot_col
        if sched.forks:  # each child samples its first output from its parent's last token
            k = len(sched.forks)
            row_slots = slot_col.copy()
            row_slots[n:n + k] = sample_slots[n:n + k] = [self.slot_of[f.child.request_id] for f in sched.forks]
            last_rows[n:n + k] = [last_rows[f.row] for f in sched.forks]
        return StepLayout(token_ids, cu, kv_lens, slot_col, n, last_rows, row_slots, sample_slots, positions)
