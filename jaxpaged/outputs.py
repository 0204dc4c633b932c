"""What generate returns: vLLM's RequestOutput / CompletionOutput / Logprob."""

import dataclasses


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]  # one dict per generated token: sampled token + top-k
PromptLogprobs = list[dict[int, Logprob] | None]  # one per prompt token (None for the first): its token + top-k


@dataclasses.dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    finish_reason: None while running, "stop" (EOS, stop string or stop token) or "length" (max_tokens or
    max_model_len), or "abort". stop_reason: the stop string or stop token id that ended it, None for EOS.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The state of one request after a step (vLLM's `RequestOutput`); `outputs` are in index order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
