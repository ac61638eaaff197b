"""Prometheus metrics of the front door, served at /metrics by the REST app.

Requests by protocol, method, model and status; latency histograms; rows per request; rows per backend call
(the coalesced batch sizes); backend calls by payload path (shared memory or inline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

REQUESTS = Counter("gradserve_requests_total", "Requests answered, by protocol, method, model and status",
                   ["protocol", "method", "model", "status"], registry=REGISTRY)
LATENCY = Histogram("gradserve_request_seconds", "Time to answer a request", ["protocol", "method", "model"],
                    buckets=LATENCY_BUCKETS, registry=REGISTRY)
ROWS = Histogram("gradserve_request_rows", "Rows per inference request", ["model"], buckets=ROW_BUCKETS,
                 registry=REGISTRY)
BATCH_ROWS = Histogram("gradserve_backend_batch_rows", "Rows per call to TorchServe (after coalescing)", ["model"],
                       buckets=ROW_BUCKETS, registry=REGISTRY)
BACKEND_CALLS = Counter("gradserve_backend_calls_total", "Calls to TorchServe, by how the request's bytes went: "
                        "shared_memory (a file the handler maps) or inline (through TorchServe)", ["payload"],
                        registry=REGISTRY)
IN_FLIGHT = Gauge("gradserve_in_flight_requests", "Inference requests being answered", registry=REGISTRY)
READY = Gauge("gradserve_backend_ready", "1 when TorchServe serves every model", registry=REGISTRY)
RESTARTS = Counter("gradserve_torchserve_restarts_total", "TorchServe restarts by the supervisor", registry=REGISTRY)


@dataclass
class Observation:
    model: str = ""
    status: str = "OK"
    rows: int = 0


UNKNOWN_MODEL = "_unknown"
_known_model: Callable[[str], bool] = lambda model: True  # noqa: E731


def label_models(known: Callable[[str], bool]) -> None:
    """Label requests with the model's name only when `known(name)`; any other name is UNKNOWN_MODEL, so that
    callers sending made-up names cannot grow the label sets (and /metrics) without bound."""
    global _known_model
    _known_model = known


@contextmanager
def observe(protocol: str, method: str, model: str = "") -> Iterator[Observation]:
    """Record one request; the body sets `.status` (and `.model`, `.rows` when it learns them)."""
    obs = Observation(model=model)
    start = time.perf_counter()
    try:
        yield obs
    finally:
        model = obs.model if not obs.model or _known_model(obs.model) else UNKNOWN_MODEL
        LATENCY.labels(protocol, method, model).observe(time.perf_counter() - start)
        REQUESTS.labels(protocol, method, model, obs.status).inc()
        if obs.rows:
            ROWS.labels(model).observe(obs.rows)


def observe_batch(model: str, rows: int) -> None:
    BATCH_ROWS.labels(model).observe(rows)
