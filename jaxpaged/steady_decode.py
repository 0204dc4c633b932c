"""The steady decode's scheduling over arrays: the running requests' planning state kept between steps, so that a
step in which every running request decodes again (one token or a multi-step) is planned by NumPy, not per
request."""

import numpy as np

from jaxpaged.page_manager import PageManager
from jaxpaged.request import Request
from jaxpaged.scheduler_output import SchedulerOutput


class SteadyDecode:
    """Plans decodes (single or multi-step) of an unchanged running list from arrays built once from its requests.

    NOTE: valid only while nothing but `schedule` changes the running requests' computed tokens, pending tokens
    or pages: the scheduler invalidates it whenever it takes any other path, and when a request leaves.
    """

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.valid = False
        self.computed = self.room = self.num_pages = np.zeros(0, np.int64)
        self.page_lists: list[list[int]] = []

    def invalidate(self) -> None:
        self.valid = False

    def build(self, running: list[Request], pages: PageManager) -> bool:
        """Reads each running request's state once; False (and stays invalid) when a request's next write goes
        into a shared page: its copy-on-write is the general pass's."""
        size, refs = self.page_size, pages.ref_counts
        computed, room, page_lists = [], [], []
        for req in running:
            own = pages.pages_of(req.request_id)
            c = req.num_computed_tokens
            if c // size < len(own) and refs[own[c // size]] > 1:
                return False
            computed.append(c)
            room.append(req.max_outputs - len(req.output_token_ids) - req.num_pending)
            page_lists.append(own)
        self.computed = np.array(computed, np.int64)  # [R] tokens whose K/V are written or being written
        self.room = np.array(room, np.int64)  # [R] tokens each may still be planned (length limits, pending counted)
        self.num_pages = np.array([len(p) for p in page_lists], np.int64)  # [R]
        self.page_lists = page_lists
        self.valid = True
        return True

    def schedule(self, running: list[Request], num_steps: int, pages: PageManager) -> SchedulerOutput | None:
        """A decode of up to `num_steps` tokens per row (fewer near a length limit; no row for a request whose
        pending tokens already reach one), marking them computed and pending; None, changing nothing, when the
        free pages cannot cover them (the general pass preempts)."""
        steps = np.clip(self.room, 0, num_steps)  # [R] tokens each row plans; 0: it waits to finish
        total = self.computed + steps  # [R]
        need = np.maximum(-(-total // self.page_size) - self.num_pages, 0)  # [R] new pages
        if not pages.extend(self.page_lists, need):
            return None
        num_pages = self.num_pages + need  # [R]
        live = np.flatnonzero(steps)  # [L]
        requests = running if len(live) == len(running) else [running[i] for i in live.tolist()]
        for req, n in zip(requests, steps[live].tolist()):
            req.num_computed_tokens += n
            req.num_pending += n
        ones = np.ones(len(live), np.int64)
        out = SchedulerOutput(list(requests), self.computed[live], ones, ones.astype(bool), steps[live],
                              num_pages[live], num_steps=num_steps if (steps > 1).any() else 1)
        self.computed, self.room, self.num_pages = total, self.room - steps, num_pages
        return out
