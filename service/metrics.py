"""Prometheus metrics of one app instance (its own CollectorRegistry, so several apps can live in one process).

Names (all prefixed `mg_`): http_requests_total{route,method,status}, http_request_duration_seconds{route},
batch_size{op} (images per engine call), batch_requests{op}, batch_seconds{op}, queue_depth (requests waiting),
queue_rejected_total (503s at admission), request_timeouts_total, cancelled_batches_total (projections stopped
because their callers were gone), purification_steps_total{dataset,init} (gradient steps × images),
purified_images_total{dataset,init}, detector_flags_total{dataset,flagged}, stage_seconds{stage,model} (per request:
the seconds it spent in each stage — decode, queue, purify, classify — on /v1 and /v2 alike; `model` is what the
engine ran: "<dataset>/<classifier>" for a classification, "<dataset>" for a purification alone, as in /v1/purify,
/v1/detect and the proxy; a merged batch's purify and classify seconds count for each of its requests).
Per-client defences (service.guard): clients_throttled_total{reason} (429s: rate | budget | detected),
query_attacks_detected_total{reason} (clients the query-attack detector stopped: matches | peer),
state_backend_up (1 while the per-client state backend answers; 0 while the service runs on in-process state).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exports; `render()` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("mg_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "mg_http_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "mg_batch_size", "images per engine call", ["op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "mg_batch_requests", "requests merged into one engine call", ["op"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "mg_batch_seconds", "engine time per batch", ["op"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mg_queue_depth", "requests waiting for the engine", registry=r)
        self.rejected = Counter("mg_queue_rejected", "requests refused at admission (queue full, or too late)",
                                registry=r)  # fmt: skip
        self.timeouts = Counter("mg_request_timeouts", "requests that ran past their timeout", registry=r)
        self.cancelled = Counter("mg_cancelled_batches", "batches stopped: their callers were gone", registry=r)
        self.steps = Counter(
            "mg_purification_steps",
            "projection gradient steps run, summed over images",
            ["dataset", "init"],
            registry=r,
        )
        self.purified = Counter("mg_purified_images", "images purified", ["dataset", "init"], registry=r)
        self.flags = Counter("mg_detector_flags", "detector decisions", ["dataset", "flagged"], registry=r)
        self.stages = Histogram("mg_stage_seconds", "seconds a request spent in a stage (decode, queue, purify, "
                                "classify)", ["stage", "model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.throttled = Counter("mg_clients_throttled", "requests refused by a per-client limit (429)", ["reason"],
                                 registry=r)  # fmt: skip
        self.attacks = Counter("mg_query_attacks_detected", "clients stopped by the query-attack detector",
                               ["reason"], registry=r)  # fmt: skip
        self.state_up = Gauge("mg_state_backend_up", "1 while the per-client state backend answers", registry=r)
        self.state_up.set(1)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, op: str, images: int, requests: int, seconds: float) -> None:
        self.batch_size.labels(op).observe(images)
        self.batch_requests.labels(op).observe(requests)
        self.batch_seconds.labels(op).observe(seconds)

    def observe_purification(self, dataset: str, init: str, images: int, steps: int) -> None:
        self.purified.labels(dataset, init).inc(images)
        self.steps.labels(dataset, init).inc(images * steps)

    def observe_flags(self, dataset: str, flagged: int, clean: int) -> None:
        if flagged:
            self.flags.labels(dataset, "true").inc(flagged)
        if clean:
            self.flags.labels(dataset, "false").inc(clean)

    def observe_stages(self, model: str, ms: Mapping[str, float]) -> None:
        """One request's milliseconds per stage."""
        for stage, v in ms.items():
            self.stages.labels(stage, model).observe(v / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)


STAGES = {"purify_ms": "purify", "classify_ms": "classify"}  # an engine result's timings, by stage


def observe_stages(metrics: Metrics | None, model: str | None, ms: Mapping[str, float]) -> None:
    """`metrics.observe_stages(model, ms)` where there are metrics and a model (else nothing)."""
    if metrics is not None and model is not None:
        metrics.observe_stages(model, ms)
