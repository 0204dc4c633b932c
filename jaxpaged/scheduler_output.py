"""What a scheduler step hands the runner and output processing: its rows as columns, forks and copy-on-writes."""

import dataclasses

import numpy as np

from jaxpaged.page_manager import PageCopy
from jaxpaged.request import Request


@dataclasses.dataclass(slots=True)
class Fork:
    """A child forked in this step from the request in row `row`: it shares the parent's pages and samples its
    first token from the parent's last hidden state (sampler row `len(requests) + its index in forks`)."""

    row: int
    child: Request


@dataclasses.dataclass(slots=True)
class SchedulerOutput:
    """What one step computes, in batch order (running requests first, then newly admitted ones), as columns: row
    i computes `counts[i]` tokens of `requests[i]` from position `starts[i]` on. The children forked in the step
    and the copy-on-writes to do on the device before its forward pass come with it.

    Columns rather than one object per row: a steady multi-step decode is planned over arrays (`SteadyDecode`)
    and its layout, page-table diff and output processing read them without a Python object per row.
    """

    requests: list[Request]  # [R]
    starts: np.ndarray       # [R] int  tokens computed before the step: the row's first position
    counts: np.ndarray       # [R] int  tokens the row's chunk computes (1 in a multi-step decode)
    samples: np.ndarray      # [R] bool  the chunk reaches the request's last token: the step samples its next one
    steps: np.ndarray        # [R] int  sub-steps: > 1 only for a multi-step decode's rows (the chunk's token, then
                             #          steps - 1 more)
    num_pages: np.ndarray    # [R] int  pages the request holds once the step's pages are allocated
    preempted: list[Request] = dataclasses.field(default_factory=list)
    num_steps: int = 1  # > 1: a multi-step decode (every row a one-token decode, up to this many sub-steps)
    forks: list[Fork] = dataclasses.field(default_factory=list)
    copies: list[PageCopy] = dataclasses.field(default_factory=list)
    # with num_steps > 1: the rows also hold prefill chunks; every row is computed by one forward pass, then the
    # decode rows (`steps` > 1) run num_steps more sub-steps in a multi-step decode
    with_prefill: bool = False

    @classmethod
    def from_rows(cls, rows: list[tuple[Request, int, int, bool, int, int]], **kwargs) -> "SchedulerOutput":
        """From (request, start, count, samples, steps, num_pages) per row."""
        if not rows:
            empty = np.zeros(0, np.int64)
            return cls([], empty, empty, empty.astype(bool), empty, empty, **kwargs)
        requests, *columns = zip(*rows)
        starts, counts, samples, steps, num_pages = (np.array(c) for c in columns)
        return cls(list(requests), starts, counts, samples.astype(bool), steps, num_pages, **kwargs)

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    def sampling_plan(self) -> tuple[np.ndarray, list[Request], np.ndarray]:
        """Sampler rows [P], requests and sub-steps [P] each samples in, of the rows that sample: scheduled rows,
        then forks (one sub-step each: a multi-step decode forks nothing)."""
        n = len(self.requests)
        if self.samples.all():
            rows, requests, steps = np.arange(n), list(self.requests), self.steps
        else:
            rows = np.flatnonzero(self.samples)
            requests, steps = [self.requests[i] for i in rows.tolist()], self.steps[rows]
        if self.forks:
            k = len(self.forks)
            rows = np.concatenate([rows, np.arange(n, n + k)])
            requests += [f.child for f in self.forks]
            steps = np.concatenate([steps, np.ones(k, steps.dtype)])
        return rows, requests, steps
