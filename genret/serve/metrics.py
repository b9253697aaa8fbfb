"""The service's Prometheus metrics (``GET /metrics``): requests by route and status, latency, batch sizes, errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """One registry per app, so two apps in a process (tests) count apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("genret_requests_total", "HTTP requests", ["path", "status"], registry=self.registry)
        self.errors = Counter("genret_errors_total", "HTTP requests answered 4xx or 5xx", ["path", "status"],
                              registry=self.registry)
        self.latency = Histogram("genret_request_seconds", "request latency", ["path"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("genret_batch_size", "requests per model call", ["kind"], registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("genret_batch_seconds", "seconds per model call", ["kind"],
                                       registry=self.registry)
        self.waiting = Gauge("genret_queue_waiting", "requests waiting for a model call", registry=self.registry)

    def request(self, path: str, status: int, seconds: float) -> None:
        """Count one request by its route's template (``/v1/images/{item_id:path}``, never the path asked for, so
        the label values are bounded)."""
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        if status >= 400:
            self.errors.labels(path, str(status)).inc()

    def batch(self, kind, size: int, seconds: float) -> None:
        self.batch_size.labels(str(kind)).observe(size)
        self.batch_seconds.labels(str(kind)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
