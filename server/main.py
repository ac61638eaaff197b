"""`gradserve serve`: TorchServe on loopback (supervised), and the gRPC + REST front door in one event loop.

SIGTERM/SIGINT: report not ready, stop accepting, let in-flight requests finish within the grace period,
stop TorchServe, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from gradserve.config import build, load_file
from server import metrics
from server.backend import Backend, Endpoint
from server.config import ServeConfig
from server.grpc_server import create_server
from server.models import ModelInfo, load_registry
from server.rest import create_app
from server.torchserve import TorchServe, TorchServeConfig, TorchServeError, archive_model_name

log = logging.getLogger("gradserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present)")
    parser.add_argument("--host", default=None, help="address the front door binds (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001; 0: any free port)")
    parser.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000; -1: no HTTP)")
    parser.add_argument("--model-store", default=None, help="folder of .mar archives (default model_store)")
    parser.add_argument("--torchserve-workdir", default=None, help="TorchServe's working folder")
    parser.add_argument("--token", default=None,
                        help="bearer token clients must send (default: $GRADSERVE_TOKEN; unset: no auth)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate for gRPC and HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for gRPC and HTTPS")
    parser.add_argument("--max-rows", type=int, default=None, help="rows one request may carry")
    parser.add_argument("--max-message-bytes", type=int, default=None, help="largest request (default 64 MiB)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="requests admitted at once")
    parser.add_argument("--token-expiration-min", type=float, default=None,
                        help="lifetime of TorchServe's internal keys (renewed before they expire)")


def main(args: argparse.Namespace) -> int:
    path = args.config or ("gradserve.yaml" if Path("gradserve.yaml").exists() else None)
    overrides = {
        "host": args.host, "grpc_port": args.grpc_port, "http_port": args.http_port,
        "model_store": args.model_store, "torchserve_workdir": args.torchserve_workdir,
        "token": args.token or os.environ.get("GRADSERVE_TOKEN") or None, "tls_cert": args.tls_cert,
        "tls_key": args.tls_key, "max_rows": args.max_rows, "token_expiration_min": args.token_expiration_min,
        "max_message_bytes": args.max_message_bytes, "max_in_flight": args.max_in_flight,
    }
    config = build(ServeConfig, load_file(path).get("serve"), overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll is noise
    return asyncio.run(serve(config))


def torchserve_config(config: ServeConfig, registry: dict[str, ModelInfo]) -> TorchServeConfig:
    return TorchServeConfig(
        model_store=Path(config.model_store), workdir=Path(config.torchserve_workdir),
        models=tuple(Path(info.archive).name for info in registry.values()),
        token_expiration_min=config.token_expiration_min, max_request_size=config.max_message_bytes + 65536,
        job_queue_size=config.torchserve_queue_size)


def check_registry(config: ServeConfig) -> dict[str, ModelInfo]:
    registry = load_registry(Path(config.model_store))
    if not registry:
        raise SystemExit(f"no .mar archive in {config.model_store}: build one with `gradserve package`")
    for info in registry.values():
        registered = archive_model_name(Path(info.archive))
        if registered != info.name:
            raise SystemExit(f"{info.archive}: TorchServe registers it as {registered!r} but its gradserve.json "
                             f"names {info.name!r}; repackage it")
    return registry


async def serve(config: ServeConfig) -> int:
    registry = check_registry(config)
    backend = Backend(config, registry, metrics.observe_batch)
    backend.on_ready_change = lambda ready: metrics.READY.set(int(ready))
    grpc_server, grpc_port = create_server(config, backend)
    http = _http_server(config, backend)
    supervisor = Supervisor(torchserve_config(config, registry), backend, config)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await grpc_server.start()
    http_task = asyncio.create_task(http.serve()) if http else None
    supervisor.start()
    log.info("front door: gRPC on %s:%d, HTTP on %s; models %s", config.host, grpc_port,
             f"{config.host}:{config.http_port}" if http else "off", sorted(registry))
    await stop.wait()

    log.info("stopping: in-flight requests get up to %.1f s", config.grace_s)
    backend.drain()  # from here new requests get UNAVAILABLE (retry elsewhere) from our own code
    deadline = loop.time() + config.grace_s
    settle = loop.time() + min(config.drain_s, config.grace_s)
    while (backend.in_flight or loop.time() < settle) and loop.time() < deadline:
        # Accepted requests finish, and callers (and load balancers) hear UNAVAILABLE from us rather than
        # have their calls cut off by the transport's shutdown.
        await asyncio.sleep(0.02)
    if http is not None:
        http.should_exit = True
    await asyncio.gather(grpc_server.stop(max(deadline - loop.time(), 0.5)), *([http_task] if http_task else []))
    await supervisor.stop()
    log.info("stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn inside our event loop: signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _http_server(config: ServeConfig, backend: Backend) -> _Server | None:
    if config.http_port < 0:
        return None
    return _Server(uvicorn.Config(
        create_app(config, backend), host=config.host, port=config.http_port, log_level="warning",
        access_log=False, lifespan="off", timeout_graceful_shutdown=int(config.grace_s) or 1,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key))


class Supervisor:
    """Keeps one TorchServe running: start, wait until ready, connect the backend; when it dies, the
    backend reports not ready and TorchServe is started again after a growing delay."""

    def __init__(self, ts_config: TorchServeConfig, backend: Backend, config: ServeConfig) -> None:
        self.torchserve = TorchServe(ts_config)
        self._backend = backend
        self._config = config
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._backend.close()
        await asyncio.to_thread(self.torchserve.stop)

    async def _run(self) -> None:
        delay = self._config.restart_backoff_s
        first = True
        while True:
            if not first:
                metrics.RESTARTS.inc()
                log.warning("restarting TorchServe in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.restart_backoff_max_s)
            first = False
            try:
                await asyncio.to_thread(self._start)
            except TorchServeError as e:
                log.error("TorchServe did not come up: %s", e)
                await asyncio.to_thread(self.torchserve.stop, 2.0)
                continue
            except Exception:  # e.g. an unwritable working folder: say so, and keep trying with backoff
                log.exception("starting TorchServe failed")
                await asyncio.to_thread(self.torchserve.stop, 2.0)
                continue
            ts = self.torchserve
            await self._backend.connect(Endpoint(ts.grpc_inference_target, ts.management_url,
                                                 ts.config.workdir / "key_file.json"))
            log.info("TorchServe ready (pid %s)", ts.pid)
            healthy_since = loop_time()
            while ts.alive:
                await asyncio.sleep(0.5)
            log.error("TorchServe (pid %s) exited with code %s; last log lines:\n%s", ts.pid, ts.returncode,
                      ts.log_tail(10))
            await self._backend.disconnect()
            await asyncio.to_thread(ts.stop, 2.0)  # reap its workers too
            if loop_time() - healthy_since > 60:
                delay = self._config.restart_backoff_s  # it ran fine for a while: start over gently

    def _start(self) -> None:
        self.torchserve.start()
        self.torchserve.wait_ready(180)


def loop_time() -> float:
    return asyncio.get_running_loop().time()
