"""Sampling parameters of one request, with vLLM's names, defaults and validation."""

import dataclasses
from enum import Enum

_SAMPLING_EPS = 1e-5
_F32_MAX, _F32_TINY = 3.4028235e38, 1.1754944e-38  # sampling runs in float32 on the device


class RequestOutputKind(Enum):
    """What each RequestOutput carries (vLLM): everything so far, only the new part, or only the final one."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request; vLLM's `SamplingParams` fields and defaults.

    `top_k=0` or `-1` disables top-k (vLLM accepts both). Stop strings are removed from the returned text unless
    `include_stop_str_in_output`; EOS and `stop_token_ids` stay in `token_ids` (as in vLLM). `logprobs=k` returns the
    sampled token's log-probability plus the top k, taken from the raw model distribution (vLLM's default
    `raw_logprobs`); `prompt_logprobs=k` does the same for every prompt token after the first (such a request skips
    the prefix cache, as in vLLM). Invalid values raise `ValueError` naming the argument, its value and the allowed
    range.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        checks = [
            ("n", self.n, isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("presence_penalty", self.presence_penalty, -2.0 <= self.presence_penalty <= 2.0, "[-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, -2.0 <= self.frequency_penalty <= 2.0, "[-2, 2]"),
            ("repetition_penalty", self.repetition_penalty, _F32_TINY <= self.repetition_penalty <= _F32_MAX,
             "> 0 and a finite float32 (at most 3.4e38)"),
            ("temperature", self.temperature, 0.0 <= self.temperature <= _F32_MAX,
             ">= 0 and a finite float32 (at most 3.4e38)"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "(0, 1]"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "-1, 0 (off) or >= 1"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "[0, 1]"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or self.max_tokens >= 1, ">= 1 or None"),
            ("min_tokens", self.min_tokens, self.min_tokens >= 0, ">= 0"),
            ("logprobs", self.logprobs, self.logprobs is None or 0 <= self.logprobs <= 20, "None or [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs,
             self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "None or [0, 20]"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {name} must be {allowed}, got {value!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams: min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams: stop must not contain empty strings.")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature < _SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """True when presence, frequency or repetition penalties change the logits."""
        return (
            abs(self.presence_penalty) > _SAMPLING_EPS
            or abs(self.frequency_penalty) > _SAMPLING_EPS
            or abs(self.repetition_penalty - 1.0) > _SAMPLING_EPS
        )

    def clone(self) -> "SamplingParams":
        """A deep copy (the engine never mutates a caller's params)."""
        return dataclasses.replace(self, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))
