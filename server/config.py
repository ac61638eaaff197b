"""The front door's configuration, `serve:` in gradserve.yaml: one frozen dataclass per component, nested in
`ServeConfig`, built by gradserve/config.py at the entry point (server/main.py) and passed down.

    serve:
      model_store: model_store
      listen:     {host: 127.0.0.1, grpc_port: 8001, http_port: 8000}
      auth:       {token: null}          # or the environment's GRADSERVE_TOKEN
      limits:     {max_rows: 1024, max_message_bytes: 67108864}
      coalesce:   {max_rows: 256, max_delay_ms: 2.0}
      torchserve: {workdir: logs/torchserve}
      shutdown:   {grace_s: 10.0}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradserve.config import ENV_TOKEN, env_field, path_field

MiB = 1024 * 1024


@dataclass(frozen=True)
class Listen:
    """Where the front door answers."""

    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0: any free port (tests)
    http_port: int = 8000  # 0: any free port; -1: no HTTP server
    # TLS for gRPC and HTTP: both files, or neither.
    tls_cert: str | None = path_field()
    tls_key: str | None = path_field()
    max_connection_age_s: int = 300  # gRPC connections are recycled after this, for client-side balancing
    # Front-door processes sharing the ports (server/doors.py): gRPC listeners joined by SO_REUSEPORT, one HTTP
    # listening socket; more than 1 pays where one process's event loop is the limit (a core each).
    processes: int = 1

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"listen.processes must be 1 or more, got {self.processes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")


AUTH_MODES = ("token", "none")


@dataclass(frozen=True)
class Auth:
    """Bearer tokens every call but health must carry: `token` (or $GRADSERVE_TOKEN), and/or `token_file` (one
    token per line; re-read when it changes, so a token is rotated without a restart, several lines being valid
    at once meanwhile). With neither, the front door answers only on loopback, unless `mode: none` says that
    something else (a mesh) authenticates."""

    token: str | None = env_field(ENV_TOKEN)
    token_file: str | None = path_field()
    mode: str = "token"  # token | none (authentication off on purpose)
    token_file_poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in AUTH_MODES:
            raise ValueError(f"auth.mode must be one of {AUTH_MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 64 * MiB  # the largest request
    # What a request's envelope (protocol framing, the codec's header) may add to its tensor bytes on the way to
    # TorchServe: its max_request_size and the backend channel's message limits are max_message_bytes + this.
    envelope_bytes: int = 64 * 1024
    max_rows: int = 1024  # rows one request may carry (the model's manifest may lower it)
    # A request's body is refused before it is read when it is larger than its model can need: max_rows rows of
    # the model's input (JSON text or raw bytes); for a model that takes image files, this many bytes of files.
    image_request_bytes: int = 32 * MiB
    max_in_flight: int = 4096  # requests admitted at once (by each front-door process); more: RESOURCE_EXHAUSTED
    default_timeout_s: float = 30.0  # deadline of a backend call when the caller sets none

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_message_bytes < 1024:
            raise ValueError("max_rows must be >= 1 and max_message_bytes >= 1024")


@dataclass(frozen=True)
class Coalesce:
    """Concurrent small requests for one model go to TorchServe as one multi-row call (max_rows 0: off)."""

    # Rows of one call at most: single rows group into calls of up to 64 at c=64, and 64-row requests into calls
    # big enough for the handler's many-thread forward (handlers/threads.py: 128 rows and up).
    max_rows: int = 256
    max_delay_ms: float = 2.0
    max_calls: int = 2  # backend calls in flight per model before requests start to queue


@dataclass(frozen=True)
class TorchServeSection:
    """TorchServe behind the door: its process, its supervision, its readiness and its keys."""

    workdir: str = path_field("logs/torchserve")
    queue_size: int = 1000  # TorchServe's job_queue_size per model (its own limit behind ours)
    ready_timeout_s: float = 180.0  # a start that is not ready by then is stopped and retried
    max_load_failures: int = 3  # a model's worker failing to load this often at start fails the start
    ready_poll_s: float = 1.0
    unknown_polls_max: int = 3  # readiness polls in a row that TorchServe leaves unanswered before "not ready"
    restart_backoff_s: float = 1.0  # first restart delay; doubles up to restart_backoff_max_s
    restart_backoff_max_s: float = 30.0
    healthy_after_s: float = 60.0  # a TorchServe that ran this long before dying restarts with the first delay
    token_renew_margin_s: float = 30.0  # renew TorchServe's keys this long before they expire
    token_expiration_min: float = 60.0  # lifetime TorchServe gives its keys
    key_wait_s: float = 2.0  # how long to wait for TorchServe to rewrite its key file after a renewal
    # Requests of shared_memory_min_bytes or more reach the handler as a file in shared_memory_dir, not through
    # TorchServe's JVM (handlers/sharedmem.py); 0 or "" sends every request inline.
    shared_memory_dir: str = "/dev/shm"
    shared_memory_min_bytes: int = 64 * 1024
    # GPUs TorchServe spreads the workers over (its number_of_gpu): None, every GPU it finds (nvidia-smi); 0, the
    # CPU only, also on a machine with GPUs.
    gpus: int | None = None
    # Options for TorchServe's JVM after ours (server/torchserve/process.py), e.g. ["-Xmx2g"] in a container
    # with a memory limit; where one sets a property ours sets too, it wins.
    jvm_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not isinstance(o, str) or not o.startswith("-") or " " in o for o in self.jvm_options):
            raise ValueError(f"torchserve.jvm_options are java options, one per item, each starting with - and "
                             f"without spaces (e.g. [-Xmx2g]); got {list(self.jvm_options)}")
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"torchserve.gpus must be 0 or more (0: CPU only), or left out for every GPU; "
                             f"got {self.gpus}")


@dataclass(frozen=True)
class Shutdown:
    grace_s: float = 10.0  # SIGTERM: time in-flight requests get to finish
    drain_s: float = 1.0  # SIGTERM: keep answering UNAVAILABLE this long before the transports close


EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True)
class ServeConfig:
    model_store: str = path_field("model_store")
    default_versions: dict[str, str] = field(default_factory=dict)  # model -> the version requests get by default
    watch_s: float = 2.0  # the model store is read again this often (0: only at start and on SIGHUP)
    listen: Listen = field(default_factory=Listen)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    coalesce: Coalesce = field(default_factory=Coalesce)
    torchserve: TorchServeSection = field(default_factory=TorchServeSection)
    shutdown: Shutdown = field(default_factory=Shutdown)
    # The event loop gRPC, REST and the calls to TorchServe share: uvloop (1-22% less front-door CPU per request in
    # most cells of bench/results/2026-11-30-ab-uvloop-digits.txt), or the standard library's (asyncio).
    event_loop: str = "uvloop"

    def __post_init__(self) -> None:
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {EVENT_LOOPS}, got {self.event_loop!r}")
