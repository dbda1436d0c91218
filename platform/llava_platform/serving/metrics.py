"""Prometheus metrics of a serving replica, served at `/metrics` in the text exposition format.

Each replica has its own registry; with several replicas, scrape them as pods (the Helm
chart's PodMonitor) rather than through the load-balanced route. Ray Serve's built-in request and
latency metrics are exported by Ray itself on the node's metrics port.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llava_requests", "Chat completion requests by outcome", ["status", "stream"],
                                registry=self.registry)
        self.latency = Histogram(
            "llava_request_latency_seconds", "End-to-end chat completion latency", ["stream"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("llava_completion_tokens", "Completion tokens generated",
                                         registry=self.registry)
        self.batch_size = Histogram("llava_batch_size", "Mean rows per decode step while a request was decoding",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.generate_seconds = Histogram(
            "llava_generate_seconds", "Time from handing a request to the engine to its last token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry,
        )
        self.in_flight = Gauge("llava_requests_in_flight", "Requests being handled by this replica",
                               registry=self.registry)
        self.engine_decoding = Gauge("llava_engine_decoding", "Requests decoding now (rows of the running batch)",
                                     registry=self.registry)
        self.engine_waiting = Gauge("llava_engine_waiting", "Requests waiting to join the running batch",
                                    registry=self.registry)
        self.engine_failures = Gauge("llava_engine_failures", "Contained engine failures since the model loaded, "
                                     "by kind (prefill, decode, compiled_decode, sampling, row, callback, step)",
                                     ["kind"], registry=self.registry)
        self.engine_eager = Gauge("llava_engine_eager_fallback", "1 while a failed compiled decode step is "
                                  "cooling down (decoding eagerly), else 0", registry=self.registry)
        self.model_info = Gauge("llava_model_info", "The model this replica serves (value 1)", ["version", "model_uri"],
                                registry=self.registry)
        self.model_loaded = Gauge("llava_model_loaded_timestamp_seconds", "When the served model was loaded",
                                  registry=self.registry)
        self.reload_failures = Counter("llava_reload_failures", "Failed attempts to follow another replica's reload",
                                       registry=self.registry)

    def observe_replica(self, engine: Any, info: dict[str, Any]) -> None:
        """Refresh the gauges read from the engine and the model at scrape time."""
        self.engine_decoding.set(engine.decoding)
        self.engine_waiting.set(engine.waiting)
        for kind, count in engine.failures.items():
            self.engine_failures.labels(kind=kind).set(count)
        self.engine_eager.set(int(bool(getattr(engine, "decoding_eagerly", False))))
        self.model_info.clear()  # one series: the version served now
        self.model_info.labels(version=info["version"], model_uri=info["model_uri"]).set(1)
        self.model_loaded.set(info["loaded_at"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
