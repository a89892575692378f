"""Prometheus metrics of the server, in a registry of its own (two apps in one process do not collide).

Names follow vLLM's where there is one, with the `lmforge_` prefix; every series carries the model id.
The scheduler thread updates them; `GET /metrics` renders them in the text exposition format.
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

# Seconds. CPU serving of small models spans milliseconds (a decode step) to minutes (a long queue).
_LATENCY = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_E2E = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.running = Gauge("lmforge_requests_running", "requests in the decode batch", m, registry=r)
        self.waiting = Gauge(
            "lmforge_requests_waiting", "requests queued for a free batch row", m, registry=r
        )
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "arrival to first generated token",
            m,
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds",
            "time between two tokens of a sequence",
            m,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "lmforge_e2e_request_latency_seconds",
            "arrival to last token of a request",
            m,
            buckets=_E2E,
            registry=r,
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens prefilled", m, registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", m, registry=r)
        self.requests = Counter(
            "lmforge_requests",
            "finished requests by outcome (stop, length, cancelled, error)",
            ["model", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "lmforge_requests_rejected", "requests refused because the queue was full", m, registry=r
        )

    def add_model(self, model: str) -> None:
        """Create the model's series at zero, so that they are scrapeable before the first request."""
        for metric in (
            self.running,
            self.waiting,
            self.ttft,
            self.itl,
            self.e2e,
            self.prompt_tokens,
            self.generation_tokens,
            self.rejected,
        ):
            metric.labels(model)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
