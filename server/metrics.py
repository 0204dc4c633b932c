"""Prometheus metrics with vLLM's names: engine gauges / counters read at scrape time, latency histograms.

Engine values come from `AsyncLLMEngine.metrics()` (the engine thread's snapshot of `LLMEngine.get_metrics()`);
counters get Prometheus' `_total` suffix, as vLLM's do (`vllm:prompt_tokens_total`). Histograms use vLLM's bucket
boundaries and are observed by the serving code. Every series carries vLLM's labels `model_name` and `engine`
(always "0": one engine per server).
"""

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxpaged.metrics import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LABELS = ["model_name", "engine"]
_ENGINE = "0"

_BUCKETS_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_BUCKETS_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_BUCKETS_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
_DOCS = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "jaxpaged:kv_pages_shared": "KV pages that sharing saves now (references beyond one per page: prefix hits, "
                                "forks of n > 1 requests).",
    "vllm:num_preemptions": "Cumulative number of preemptions from the engine.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "jaxpaged:step_tokens": "Tokens the engine steps ran (each sub-step of a multi-step decode counted).",
    "jaxpaged:step_padding_tokens": "Padding tokens the steps' bucket shapes added to them.",
    "jaxpaged:step_rows": "Sequence rows the engine steps ran.",
    "jaxpaged:step_padding_rows": "Padding rows the steps' sequence buckets added.",
}


class _EngineCollector(Collector):
    """Turns the engine's metric snapshot into Prometheus families at scrape time."""

    def __init__(self, snapshot: Callable[[], list], model_name: Callable[[], str]):
        self._snapshot = snapshot
        self._model_name = model_name

    def collect(self):
        metrics = self._snapshot()
        if not metrics:
            return
        label = self._model_name()
        for m in metrics:
            family = (CounterMetricFamily if isinstance(m, Counter) else GaugeMetricFamily)(
                m.name, _DOCS.get(m.name, m.name), labels=_LABELS)
            family.add_metric([label, _ENGINE], m.value)
            yield family


class ServerMetrics:
    """The server's registry: engine state plus TTFT / inter-token / end-to-end latency histograms."""

    def __init__(self, snapshot: Callable[[], list], model_name: Callable[[], str]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, model_name))
        self._model_name = model_name

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=self.registry)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         _BUCKETS_TTFT)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        _BUCKETS_ITL)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        _BUCKETS_E2E)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self, self._model_name())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one engine request's latencies as its outputs arrive (from its arrival at the server)."""

    def __init__(self, metrics: ServerMetrics, model_name: str):
        self._ttft = metrics.ttft.labels(model_name, _ENGINE)
        self._itl = metrics.itl.labels(model_name, _ENGINE)
        self._e2e = metrics.e2e.labels(model_name, _ENGINE)
        self._start = self._last = time.monotonic()
        self._tokens = 0

    def on_output(self, num_tokens: int) -> None:
        """`num_tokens`: tokens generated so far over all `n` completions."""
        now = time.monotonic()
        new = num_tokens - self._tokens
        if new <= 0:
            return
        if self._tokens == 0:
            self._ttft.observe(now - self._start)
        else:
            for _ in range(new):  # one observation per token, as vLLM's inter-token histogram counts them
                self._itl.observe((now - self._last) / new)
        self._tokens, self._last = num_tokens, now

    def finish(self) -> None:
        self._e2e.observe(time.monotonic() - self._start)
