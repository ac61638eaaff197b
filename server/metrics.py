"""Prometheus metrics of the front door, served at /metrics by the REST app.

Requests by protocol, method, model and status; latency histograms; rows per request; rows per backend call
(the coalesced batch sizes); backend calls by payload path (shared memory or inline). With several front-door
processes (listen.processes), /metrics in any of them reports all of them together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


REQUESTS: Counter
LATENCY: Histogram
ROWS: Histogram
BATCH_ROWS: Histogram
BACKEND_CALLS: Counter
IN_FLIGHT: Gauge
READY: Gauge
RESTARTS: Counter


def _define(registry: CollectorRegistry) -> None:
    """The metrics, registered in `registry` (made again when the processes share them)."""
    global REQUESTS, LATENCY, ROWS, BATCH_ROWS, BACKEND_CALLS, IN_FLIGHT, READY, RESTARTS
    REQUESTS = Counter("gradserve_requests_total", "Requests answered, by protocol, method, model and status",
                       ["protocol", "method", "model", "status"], registry=registry)
    LATENCY = Histogram("gradserve_request_seconds", "Time to answer a request", ["protocol", "method", "model"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    ROWS = Histogram("gradserve_request_rows", "Rows per inference request", ["model"], buckets=ROW_BUCKETS,
                     registry=registry)
    BATCH_ROWS = Histogram("gradserve_backend_batch_rows", "Rows per call to TorchServe (after coalescing)",
                           ["model"], buckets=ROW_BUCKETS, registry=registry)
    BACKEND_CALLS = Counter("gradserve_backend_calls_total", "Calls to TorchServe, by how the request's bytes "
                            "went: shared_memory (a file the handler maps) or inline (through TorchServe)",
                            ["payload"], registry=registry)
    # Several processes: the sum of theirs, and 0 while any one is not ready (the processes that are alive).
    IN_FLIGHT = Gauge("gradserve_in_flight_requests", "Inference requests being answered", registry=registry,
                      multiprocess_mode="livesum")
    READY = Gauge("gradserve_backend_ready", "1 when TorchServe serves every model", registry=registry,
                  multiprocess_mode="livemin")
    RESTARTS = Counter("gradserve_torchserve_restarts_total", "TorchServe restarts by the supervisor",
                       registry=registry)


REGISTRY = CollectorRegistry()
_define(REGISTRY)


def share_between_processes(directory: str) -> None:
    """From now on this process's metrics go to files in `directory`, and REGISTRY (what /metrics serves) adds up
    those of every front-door process writing there (prometheus_client's multiprocess mode; server/doors.py).
    Call it before any metric is touched."""
    global REGISTRY
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()
    _define(CollectorRegistry())  # written to files; read back through the collector only
    REGISTRY = CollectorRegistry()
    multiprocess.MultiProcessCollector(REGISTRY, directory)


def process_ended(pid: int, directory: str) -> None:
    """A front-door process is gone: its gauges no longer count (its counters still do)."""
    multiprocess.mark_process_dead(pid, directory)


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
