"""What a scheduler step hands the runner and output processing: its rows, forks and copy-on-writes."""

import dataclasses

from jaxpaged.page_manager import PageCopy
from jaxpaged.request import Request


@dataclasses.dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: `num_new_tokens` tokens from `num_computed_tokens` on.

    `samples`: the chunk reaches the request's last token, so the step samples its next one (a pending token).
    `num_steps` > 1 only in a multi-step decode: the one-token chunk, then `num_steps - 1` more decode steps.
    """

    request: Request
    num_computed_tokens: int
    num_new_tokens: int
    samples: bool
    num_steps: int = 1


@dataclasses.dataclass(slots=True)
class Fork:
    """A child forked in this step from the request in row `row`: it shares the parent's pages and samples its
    first token from the parent's last hidden state (sampler row `len(scheduled) + its index in forks`)."""

    row: int
    child: Request


@dataclasses.dataclass(slots=True)
class SchedulerOutput:
    """What one step computes, in batch order (running requests first, then newly admitted ones), the children
    forked in it and the copy-on-writes to do on the device before its forward pass."""

    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_steps: int = 1  # > 1: a multi-step decode (every row a one-token decode, up to this many sub-steps)
    forks: list[Fork] = dataclasses.field(default_factory=list)
    copies: list[PageCopy] = dataclasses.field(default_factory=list)
    # with num_steps > 1: the rows also hold prefill chunks; every row is computed by one forward pass, then the
    # decode rows (`ScheduledRequest.num_steps` > 1) run num_steps more sub-steps in a multi-step decode
    with_prefill: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def sampling_plan(self) -> list[tuple[int, Request, int]]:
        """(sampler row, request, sub-steps it samples in) of the rows that sample: scheduled rows, then forks (one
        sub-step each: a multi-step decode forks nothing)."""
        rows = [(row, s.request, s.num_steps) for row, s in enumerate(self.scheduled) if s.samples]
        return rows + [(len(self.scheduled) + i, f.child, 1) for i, f in enumerate(self.forks)]
