"""The front door's configuration: one frozen dataclass, built from gradserve.yaml's `serve:` section and
the command line at the entry point (server/main.py), then passed down."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0: any free port (tests)
    http_port: int = 8000  # 0: any free port; -1: no HTTP server
    model_store: str = "model_store"
    torchserve_workdir: str = "logs/torchserve"
    # Bearer token every call but health must carry; None: no authentication.
    token: str | None = None
    # TLS for gRPC and HTTP: both files, or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 64 * MiB
    max_rows: int = 1024  # rows one request may carry (the model's manifest may lower it)
    torchserve_queue_size: int = 1000  # TorchServe's job_queue_size per model (its own limit behind ours)
    max_in_flight: int = 4096  # requests admitted at once; more are refused with RESOURCE_EXHAUSTED
    default_timeout_s: float = 30.0  # deadline of a backend call when the caller sets none
    grace_s: float = 10.0  # SIGTERM: time in-flight requests get to finish
    drain_s: float = 1.0  # SIGTERM: keep answering UNAVAILABLE this long before the transports close
    max_connection_age_s: int = 300  # gRPC connections are recycled after this, for client-side balancing
    # Coalescing of concurrent small requests into one multi-row backend call (0 rows: off).
    coalesce_max_rows: int = 64
    coalesce_max_delay_ms: float = 2.0
    coalesce_max_calls: int = 2  # backend calls in flight per model before requests start to queue
    # TorchServe supervision and token renewal.
    ready_poll_s: float = 1.0
    unknown_polls_max: int = 3  # readiness polls in a row that TorchServe leaves unanswered before "not ready"
    restart_backoff_s: float = 1.0  # first restart delay; doubles up to restart_backoff_max_s
    restart_backoff_max_s: float = 30.0
    token_renew_margin_s: float = 30.0  # renew TorchServe's keys this long before they expire
    token_expiration_min: float = 60.0  # lifetime TorchServe gives its keys

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        if self.max_rows < 1 or self.max_message_bytes < 1024:
            raise ValueError("max_rows must be >= 1 and max_message_bytes >= 1024")
