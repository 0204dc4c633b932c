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


@dataclasses.dataclass
class PaddingStats:
    """What the bucketed step shapes cost: real tokens and sequence rows the steps ran, and the padding their
    buckets added (a multi-step decode counts each sub-step)."""

    tokens: int = 0
    padding_tokens: int = 0
    rows: int = 0
    padding_rows: int = 0

    def record(self, tokens: int, bucket_tokens: int, rows: int, bucket_rows: int) -> None:
        self.tokens += tokens
        self.padding_tokens += bucket_tokens - tokens
        self.rows += rows
        self.padding_rows += bucket_rows - rows
