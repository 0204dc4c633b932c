"""Prometheus metrics with vLLM's names: engine gauges/counters read at scrape time, latency histograms."""

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_BUCKETS_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_BUCKETS_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_BUCKETS_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
_COUNTERS = {"vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
             "vllm:generation_tokens", "vllm:request_success"}


class _EngineCollector:
    """Reads `engine.get_metrics()` at scrape time (counters get Prometheus' `_total` suffix)."""

    def __init__(self, engine_getter, model_name: str):
        self._engine = engine_getter
        self._labels = {"model_name": model_name}

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        for m in engine.get_metrics():
            family = CounterMetricFamily if m.name in _COUNTERS else GaugeMetricFamily
            metric = family(m.name, m.name.replace("vllm:", "").replace("_", " "), labels=list(self._labels))
            metric.add_metric(list(self._labels.values()), m.value)
            yield metric


class ServerMetrics:
    """The server's registry: engine state plus TTFT / inter-token / end-to-end latency histograms."""

    def __init__(self, engine_getter, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_getter, model_name))
        labels = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token", _BUCKETS_TTFT)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens", _BUCKETS_ITL)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency", _BUCKETS_E2E)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's latencies as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._start = self._last = time.monotonic()
        self._tokens = 0

    def on_output(self, num_tokens: int) -> None:
        now = time.monotonic()
        new = num_tokens - self._tokens
        if new > 0:
            if self._tokens == 0:
                self._m.ttft.observe(now - self._start)
            else:
                self._m.itl.observe((now - self._last) / new)
            self._tokens, self._last = num_tokens, now

    def finish(self) -> None:
        self._m.e2e.observe(time.monotonic() - self._start)
