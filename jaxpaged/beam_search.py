"""Beam search with vLLM's API (`LLM.beam_search`, `BeamSearchParams`): beams are sequences that share pages.

vLLM's algorithm: at every step each live beam offers its 2 x beam_width most likely next tokens (raw logprobs);
a candidate ending in EOS joins the finished hypotheses (unless ignore_eos), and the beam_width best of the
others by `beam_score` become the next beams. After max_tokens steps (or at max_model_len) the live beams join the
finished ones and the beam_width best of all are returned, best first. `beam_score` is vLLM's
`cum_logprob / len ** length_penalty`, `len` counting the prompt and the output, a final EOS not counted.

Where HF transformers' `generate(num_beams=k, early_stopping=True)` differs: HF stops once k hypotheses have
finished (vLLM always runs max_tokens steps, so later, better-scoring hypotheses can still win) and divides by
the generated length only. With EOS disabled every hypothesis has the same length, so both keep the same beams.

`temperature` is accepted as in vLLM; beams are ranked by the raw logprobs, as vLLM v1 returns them.
"""

import dataclasses
import math

from jaxpaged.outputs import Logprob

MAX_BEAM_WIDTH = 10  # 2 x beam_width candidates per beam come from the sampler's top-20 logprobs
_MAX_LOG = 709.0  # math.exp's largest argument with a finite float result, rounded down


@dataclasses.dataclass
class BeamSearchParams:
    """vLLM's beam-search parameters; invalid values raise ValueError naming the argument and the range."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("beam_width", self.beam_width, isinstance(self.beam_width, int)
             and 1 <= self.beam_width <= MAX_BEAM_WIDTH, f"an integer in [1, {MAX_BEAM_WIDTH}]"),
            ("max_tokens", self.max_tokens, isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "an integer >= 1"),
            ("temperature", self.temperature, self.temperature >= 0.0, ">= 0"),
            ("length_penalty", self.length_penalty, math.isfinite(self.length_penalty), "a finite float"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"BeamSearchParams: {name} must be {allowed}, got {value!r}.")


@dataclasses.dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's): `tokens` holds the prompt and the output."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(num_tokens: int, ends_with_eos: bool, cum_logprob: float, length_penalty: float) -> float:
    """vLLM's `get_beam_search_score`: cum_logprob / len ** length_penalty, without a final EOS in len.

    Where len ** length_penalty leaves a float's range (any finite penalty is accepted: 600 ** 397 overflows,
    600 ** -400 is 0.0), the same quotient is taken through logarithms and saturates (to -0.0 or about -8e307)
    instead of raising: beams that far apart in score keep their order, saturated ones tie.
    """
    n = max(num_tokens - ends_with_eos, 1)
    try:
        scale = float(n) ** length_penalty
    except OverflowError:
        scale = math.inf
    if 0.0 < scale < math.inf:
        return cum_logprob / scale
    if cum_logprob == 0.0:
        return 0.0
    log_value = math.log(abs(cum_logprob)) - length_penalty * math.log(n)
    return math.copysign(math.exp(min(log_value, _MAX_LOG)), cum_logprob)


@dataclasses.dataclass
class Hypothesis:
    """A beam's output so far: tokens, their logprob dicts, the sum of their logprobs, how it ended."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class BeamMove:
    """Next beam `index` continues beam `source` with `token` (its logprob dict `logprobs`)."""

    source: int
    token: int
    cum_logprob: float
    logprobs: dict[int, Logprob]


class BeamState:
    """The host side of one beam-search request: each live beam's candidates of the current step and the
    hypotheses finished so far. Beams are numbered 0..beam_width-1 (the request's sequences)."""

    def __init__(self, params: BeamSearchParams, num_prompt_tokens: int, eos_token_ids: frozenset[int]):
        self.params = params
        self.num_prompt_tokens = num_prompt_tokens
        self.eos_token_ids = eos_token_ids
        self.finished: list[Hypothesis] = []
        self.candidates: dict[int, list[tuple[int, dict[int, Logprob]]]] = {}  # beam -> [(token, dict)]
        self.num_live = 1  # beams 0..num_live-1 are live; before the first selection all are one (the prompt)

    def offer(self, beam: int, candidates: list[tuple[int, dict[int, Logprob]]]) -> None:
        """Beam `beam`'s candidates of this step: (token, its logprob dict), most likely first (ignored for a beam
        that is not live, e.g. the copies of the prompt before the first selection)."""
        if beam < self.num_live:
            self.candidates[beam] = candidates

    @property
    def ready(self) -> bool:
        """Every live beam has offered its candidates for this step."""
        return len(self.candidates) == self.num_live

    def select(self, beams: list[Hypothesis]) -> list[BeamMove]:
        """The next beams, best first (move i becomes beam i; fewer than beam_width when too few candidates are
        left), from the offered candidates of the live `beams` (their current hypotheses); candidates ending in
        EOS are added to `finished`."""
        p = self.params
        length = self.num_prompt_tokens + len(beams[0].token_ids) + 1
        pool = []
        for b in sorted(self.candidates):
            for token, lps in self.candidates[b]:
                cum = beams[b].cum_logprob + lps[token].logprob
                if token in self.eos_token_ids and not p.ignore_eos:
                    self.finished.append(Hypothesis(beams[b].token_ids + [token], beams[b].logprobs + [lps], cum,
                                                    "stop"))
                else:
                    pool.append(BeamMove(b, token, cum, lps))
        self.candidates.clear()
        pool.sort(key=lambda m: beam_score(length, False, m.cum_logprob, p.length_penalty), reverse=True)
        moves = pool[:p.beam_width]
        self.num_live = len(moves)
        return moves

    def best(self, beams: list[Hypothesis]) -> list[Hypothesis]:
        """The beam_width best of the finished hypotheses and the live beams (which end with "length")."""
        everything = self.finished + [dataclasses.replace(b, finish_reason="length") for b in beams]

        def score(h: Hypothesis) -> float:
            eos = h.finish_reason == "stop"
            return beam_score(self.num_prompt_tokens + len(h.token_ids), eos, h.cum_logprob, self.params.length_penalty)

        return sorted(everything, key=score, reverse=True)[:self.params.beam_width]
