"""One front-door process: its data plane (server/backend.py) and its transports (the gRPC and the HTTP server on
one event loop), started and stopped together. `gradserve serve` (server/main.py) runs one, and each further
process of `listen.processes` (server/doors.py) another.

Stopping: report not ready and answer new requests UNAVAILABLE (retry elsewhere), let accepted ones finish within
the shutdown grace, then close the transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from handlers.sharedmem import PayloadArea
from server import metrics
from server.auth import Tokens
from server.backend import Backend
from server.config import ServeConfig
from server.grpc_server import create_server
from server.lifecycle import ModelManager
from server.rest import create_app
from server.torchserve.client import TorchServeClient

log = logging.getLogger("gradserve.serve")


def run(config: ServeConfig, main: Coroutine[Any, Any, int]) -> int:
    """`main` to its end on the event loop `config` names."""
    factory = None
    if config.event_loop == "uvloop":
        import uvloop  # uvicorn[standard]'s, as its own servers use it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def configure_logging(process: str = "") -> None:
    """Log lines to stderr; `process` names the front-door process they come from when there are several."""
    where = f"{process} " if process else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll is noise


def data_plane(config: ServeConfig, models: ModelManager, client: TorchServeClient,
               shared_regions: Path | None = None) -> Backend:
    """The backend requests go through, with its metrics."""
    ts = config.torchserve
    backend = Backend(config, models, client, metrics.observe_batch,
                      PayloadArea.open(ts.shared_memory_dir, ts.shared_memory_min_bytes), shared_regions)
    backend.add_ready_listener(lambda ready: metrics.READY.set(int(ready)))
    metrics.label_models(models.knows)
    return backend


def check_port_free(host: str, port: int) -> None:
    """OSError when `port` is taken. Listeners that share a port (SO_REUSEPORT) would join another server's
    listeners there, if it shared its port too, instead of failing to bind: the first process asks first."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(f"cannot listen on {host}:{port}: the port is taken") from None
            raise


class Transports:
    """The gRPC server and the HTTP server of one front-door process. `http_socket`: a listening socket the
    processes share (else the HTTP server binds its own); `share_port`: the gRPC listener joins the others on the
    port (SO_REUSEPORT). A transport that fails sets `stop`."""

    def __init__(self, config: ServeConfig, backend: Backend, tokens: Tokens, stop: asyncio.Event,
                 http_socket: socket.socket | None = None, share_port: bool = False) -> None:
        self._config, self._backend, self._stop = config, backend, stop
        self.grpc, self.grpc_port = create_server(config, backend, tokens, share_port)
        self.http = _http_server(config, backend, tokens)
        self._http_socket = http_socket
        self._http_task: asyncio.Task[None] | None = None
        self.failed: list[str] = []

    def bind_http(self) -> socket.socket | None:
        """The HTTP listening socket, bound now (for further processes to share), or None without HTTP."""
        if self.http is not None and self._http_socket is None:
            self._http_socket = self.http.config.bind_socket()
        return self._http_socket

    async def start(self) -> None:
        await self.grpc.start()
        if self.http is not None:
            sockets = [self._http_socket] if self._http_socket is not None else None
            self._http_task = asyncio.create_task(self.http.serve(sockets))
            self._http_task.add_done_callback(self._http_ended)

    async def stop(self) -> None:
        """Stop taking requests, let accepted ones finish within the grace, close."""
        remaining = await drain(self._config, self._backend)
        if self.http is not None:
            self.http.should_exit = True
        await asyncio.gather(self.grpc.stop(remaining), *([self._http_task] if self._http_task else []))

    def _http_ended(self, task: asyncio.Task[None]) -> None:
        """The HTTP server ended: expected once `stop` is set; before that (its port taken, ...) the whole server
        stops, rather than serve gRPC alone while REST clients and probes fail."""
        if self._stop.is_set():
            return
        error = task.exception() if not task.cancelled() else None
        self.failed.append(str(error))
        log.error("the HTTP server ended (%s); stopping", error or "it could not start: see above")
        self._stop.set()


async def drain(config: ServeConfig, backend: Backend) -> float:
    """Stop taking requests and let accepted ones finish, within the shutdown grace; returns the seconds of
    grace left for the transports (at least half a second)."""
    loop = asyncio.get_running_loop()
    grace = config.shutdown.grace_s
    log.info("stopping: in-flight requests get up to %.1f s", grace)
    backend.drain()  # from here new requests get UNAVAILABLE (retry elsewhere) from our own code
    deadline = loop.time() + grace
    settle = loop.time() + min(config.shutdown.drain_s, grace)
    while (backend.in_flight or loop.time() < settle) and loop.time() < deadline:
        # Accepted requests finish, and callers (and load balancers) hear UNAVAILABLE from us rather than
        # have their calls cut off by the transport's shutdown.
        await asyncio.sleep(0.02)
    return max(deadline - loop.time(), 0.5)


class _Server(uvicorn.Server):
    """uvicorn inside our event loop: signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _http_server(config: ServeConfig, backend: Backend, tokens: Tokens) -> _Server | None:
    listen = config.listen
    if listen.http_port < 0:
        return None
    return _Server(uvicorn.Config(
        create_app(config, backend, tokens), host=listen.host, port=listen.http_port, log_level="warning",
        access_log=False, lifespan="off", timeout_graceful_shutdown=int(config.shutdown.grace_s) or 1,
        ssl_certfile=listen.tls_cert, ssl_keyfile=listen.tls_key))
