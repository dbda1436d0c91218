"""Prometheus metrics of a serving replica, served at `/metrics` in the text exposition format.

Each replica has its own registry; with several replicas, scrape them as pods (the Helm
chart's PodMonitor) rather than through the load-balanced route. Ray Serve's built-in request and
latency metrics are exported by Ray itself on the node's metrics port.
"""

from __future__ import annotations

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

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
