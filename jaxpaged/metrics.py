"""vLLM-named engine metrics, as returned by `LLM.get_metrics()`."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gauge:
    """A value that goes up and down (vLLM's `vllm.v1.metrics.reader.Gauge`)."""

    name: str
    value: float


@dataclasses.dataclass(frozen=True)
class Counter:
    """A monotonically increasing count (vLLM's `vllm.v1.metrics.reader.Counter`)."""

    name: str
    value: int


@dataclasses.dataclass
class EngineCounters:
    """Totals the engine accumulates over its life."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_requests_finished: int = 0
