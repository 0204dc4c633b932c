"""One request's state as it moves through the scheduler (one sequence; `n > 1` forks child requests from the
first one once its prompt is computed)."""

import dataclasses
import enum
import time

from jaxpaged.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclasses.dataclass(slots=True, eq=False)
class Request:
    """A sequence being generated.

    NOTE: `num_computed_tokens` counts tokens whose K/V are in this request's pages or are being written by a
    scheduled step; it catches up to `num_tokens` (prompt + output + pending). `num_pending` counts tokens that
    scheduled steps will sample but whose ids have not reached the host yet (async scheduling: at most two
    steps' worth, each up to `num_scheduler_steps` tokens, one more with `multi_step_with_prefill`). Ids sampled
    after the request finished are dropped. A preempted request drops to 0 and is recomputed.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    seed: int = 0  # uint32 sampling seed: the request's own or one drawn from the engine's seeded RNG
    group: object = None  # the RequestGroup (user request) this sequence belongs to
    index: int = 0  # this sequence's index among the group's `n` completions
    detokenizer: object = None  # the group's detokenizer of this sequence
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_pending: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit tokens at first scheduling; -1 until then
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list = dataclasses.field(default_factory=list)  # per output token: (top ids, top lps, sampled lp, rank)
    page_hashes: list[int] = dataclasses.field(default_factory=list)  # chained hashes of full pages, in order
    forks: list["Request"] = dataclasses.field(default_factory=list)  # siblings to fork once the prompt is computed
    host_sync: bool = False  # each token must reach the host before the next step (penalties, beam search)
    stop_ids: frozenset[int] = dataclasses.field(init=False, default=frozenset())  # stop ids, EOS unless ignored
    # outputs it may have: max_tokens, capped by `cap_outputs` at what max_model_len leaves
    max_outputs: int = dataclasses.field(init=False, default=0)
    plain: bool = dataclasses.field(init=False, default=True)  # no stop strings or logprobs: no per-token look

    def __post_init__(self) -> None:
        self.host_sync = self.host_sync or self.sampling_params.has_penalties  # penalties read tokens on the host
        p = self.sampling_params
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        self.max_outputs = p.max_tokens if p.max_tokens is not None else 1 << 62
        self.plain = not p.stop and p.logprobs is None

    def cap_outputs(self, max_model_len: int) -> None:
        """Caps `max_outputs` at what `max_model_len` leaves after the prompt (idempotent)."""
        self.max_outputs = min(self.max_outputs, max_model_len - len(self.prompt_token_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + output + pending tokens: the length the scheduler plans with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt + output tokens whose ids the host has."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_outputs(self, token_ids: list[int]) -> None:
        """Pending tokens' ids arrived from the device."""
        self.output_token_ids += token_ids
        self.num_pending -= len(token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def finished(self) -> bool:
        status = self.status  # identity tests: an Enum's hash (set membership) runs Python code
        return not (status is RequestStatus.RUNNING or status is RequestStatus.WAITING
                    or status is RequestStatus.PREEMPTED)

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
