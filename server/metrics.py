"""Prometheus metrics of the front door, served at /metrics by the REST app.

Requests by protocol, method, model and status; latency histograms; rows per request; rows per backend call
(the coalesced batch sizes); backend calls by payload path (shared memory or inline). With several front-door
processes (listen.processes), /metrics in any of them reports all of them together.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

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
    for cached in (_children, _requests, backend_calls, _batch_rows):  # children of the metrics made before
        cached.cache_clear()
    REGISTRY = CollectorRegistry()
    multiprocess.MultiProcessCollector(REGISTRY, directory)


def process_ended(pid: int, directory: str) -> None:
    """A front-door process is gone: its gauges no longer count (its counters still do)."""
    multiprocess.mark_process_dead(pid, directory)


class Observation:
    """One request being recorded (`observe`); the body sets `.status` (and `.model`, `.rows` when it learns
    them)."""

    __slots__ = ("protocol", "method", "model", "status", "rows", "_start")

    def __init__(self, protocol: str, method: str, model: str = "") -> None:
        self.protocol, self.method, self.model = protocol, method, model
        self.status, self.rows = "OK", 0

    def __enter__(self) -> Observation:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self._start
        model = self.model if not self.model or _known_model(self.model) else UNKNOWN_MODEL
        latency, rows = _children(self.protocol, self.method, model)
        latency.observe(seconds)
        _requests(self.protocol, self.method, model, self.status).inc()
        if self.rows:
            rows.observe(self.rows)


UNKNOWN_MODEL = "_unknown"
_known_model: Callable[[str], bool] = lambda model: True  # noqa: E731


def label_models(known: Callable[[str], bool]) -> None:
    """Label requests with the model's name only when `known(name)`; any other name is UNKNOWN_MODEL, so that
    callers sending made-up names cannot grow the label sets (and /metrics) without bound."""
    global _known_model
    _known_model = known


def observe(protocol: str, method: str, model: str = "") -> Observation:
    """Record one request: `with observe("grpc", "ModelInfer", name) as obs: ...`."""
    return Observation(protocol, method, model)


# A labelled metric is looked up once per label set (prometheus_client's `labels` takes a lock and builds a key each
# time): with these, recording a request cost 8 us instead of 18.
@functools.cache
def _children(protocol: str, method: str, model: str) -> tuple[Any, Any]:
    return LATENCY.labels(protocol, method, model), ROWS.labels(model)


@functools.cache
def _requests(protocol: str, method: str, model: str, status: str) -> Any:
    return REQUESTS.labels(protocol, method, model, status)


@functools.cache
def backend_calls(payload: str) -> Any:
    """BACKEND_CALLS for `payload` ("shared_memory" or "inline")."""
    return BACKEND_CALLS.labels(payload)


@functools.cache
def _batch_rows(model: str) -> Any:
    return BATCH_ROWS.labels(model)


def observe_batch(model: str, rows: int) -> None:
    _batch_rows(model).observe(rows)
