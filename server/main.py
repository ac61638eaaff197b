"""`gradserve serve`: TorchServe on loopback (supervised), and the gRPC + REST front door in one event loop
(server/frontdoor.py); with `listen.processes` above 1, that many front-door processes share the ports
(server/doors.py), this one running TorchServe and reading the model store for all.

SIGTERM/SIGINT: report not ready, stop accepting, let in-flight requests finish within the grace period (the
other processes too), stop TorchServe, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from server import metrics
from server.auth import Tokens, check_exposure
from server.backend import Backend
from server.config import ServeConfig
from server.doors import Doors, SharedFolder
from server.frontdoor import Transports, check_port_free, configure_logging, data_plane, run
from server.lifecycle import ModelManager
from server.torchserve.client import TorchServeClient
from server.torchserve.process import TorchServeConfig
from server.torchserve.supervisor import Supervisor

log = logging.getLogger("gradserve.serve")

# flag -> the ServeConfig field it sets (dotted for nested sections)
FLAGS = {"host": "listen.host", "grpc_port": "listen.grpc_port", "http_port": "listen.http_port",
         "model_store": "model_store", "torchserve_workdir": "torchserve.workdir", "token": "auth.token",
         "token_file": "auth.token_file", "auth_mode": "auth.mode", "watch": "watch_s",
         "tls_cert": "listen.tls_cert", "tls_key": "listen.tls_key", "max_rows": "limits.max_rows",
         "max_message_bytes": "limits.max_message_bytes", "max_in_flight": "limits.max_in_flight",
         "token_expiration_min": "torchserve.token_expiration_min", "processes": "listen.processes"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present)")
    parser.add_argument("--host", default=None, help="address the front door binds (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001; 0: any free port)")
    parser.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000; -1: no HTTP)")
    parser.add_argument("--model-store", default=None, help="folder of .mar archives (default model_store)")
    parser.add_argument("--torchserve-workdir", default=None, help="TorchServe's working folder")
    parser.add_argument("--token", default=None,
                        help="bearer token clients must send (default: $GRADSERVE_TOKEN; prefer it, or "
                             "--token-file: a flag shows in `ps`)")
    parser.add_argument("--token-file", default=None,
                        help="file of valid tokens, one per line, read again when it changes (e.g. a mounted Secret)")
    parser.add_argument("--no-auth", dest="auth_mode", action="store_const", const="none", default=None,
                        help="no authentication, on purpose (something in front authenticates); logs a warning")
    parser.add_argument("--watch", type=float, default=None,
                        help="seconds between readings of the model store (default 2; 0: only at start and SIGHUP)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate for gRPC and HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for gRPC and HTTPS")
    parser.add_argument("--max-rows", type=int, default=None, help="rows one request may carry")
    parser.add_argument("--max-message-bytes", type=int, default=None, help="largest request (default 64 MiB)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="requests admitted at once")
    parser.add_argument("--processes", type=int, default=None,
                        help="front-door processes sharing the ports (default 1; e.g. one per core left over "
                             "after TorchServe's workers)")
    parser.add_argument("--token-expiration-min", type=float, default=None,
                        help="lifetime of TorchServe's internal keys (renewed before they expire)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    overrides = {field: getattr(args, flag, None) for flag, field in FLAGS.items()}
    return gradserve_config.load(ServeConfig, gradserve_config.default_path(args.config), "serve", overrides)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    configure_logging()
    return run(config, serve(config))


def torchserve_config(config: ServeConfig) -> TorchServeConfig:
    """TorchServe with no model at start: the model manager loads each archive itself (server/lifecycle.py)."""
    return TorchServeConfig(
        model_store=Path(config.model_store), workdir=Path(config.torchserve.workdir), models=(),
        enable_model_api=True, token_expiration_min=config.torchserve.token_expiration_min,
        max_request_size=config.limits.max_message_bytes + config.limits.envelope_bytes,
        job_queue_size=config.torchserve.queue_size, number_of_gpu=config.torchserve.gpus,
        jvm_options=config.torchserve.jvm_options)


async def serve(config: ServeConfig, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; `on_ready()` runs once, the first time every model is served."""
    tokens = Tokens(config.auth)
    check_exposure(config.listen.host, tokens, config.auth)
    store = Path(config.model_store)
    if not store.is_dir():
        raise UsageError(f"the model store {store} is not a folder: build an archive there with `gradserve package`")
    shared = _shared_folder(config)
    try:
        client = TorchServeClient(config.torchserve)
        models = ModelManager(store, client, config.default_versions,
                              load_timeout_s=config.torchserve.ready_timeout_s)
        backend = data_plane(config, models, client, shared and shared.regions)
        if on_ready is not None:
            backend.add_ready_listener(_first_time(on_ready))
        stop = asyncio.Event()
        transports = Transports(config, backend, tokens, stop, share_port=shared is not None)
        doors = None
        if shared is not None:
            doors = Doors(config, models, client, transports.grpc_port, transports.bind_http(), shared)
        supervisor = Supervisor(torchserve_config(config), client, config.torchserve, models.torchserve_started,
                                models.torchserve_stopped, metrics.RESTARTS.inc)
        return await _serve(config, tokens, stop, models, backend, transports, supervisor, doors)
    finally:
        if shared is not None:
            shutil.rmtree(shared.root, ignore_errors=True)


def _shared_folder(config: ServeConfig) -> SharedFolder | None:
    """With several front-door processes, the folder they share (their metrics, the clients' regions); None
    with one. Before any metric is touched: this process's go to files from here on."""
    if config.listen.processes == 1:
        return None
    if config.listen.grpc_port:
        check_port_free(config.listen.host, config.listen.grpc_port)
    shared = SharedFolder.create()
    metrics.share_between_processes(str(shared.metrics))
    return shared


async def _serve(config: ServeConfig, tokens: Tokens, stop: asyncio.Event, models: ModelManager, backend: Backend,
                 transports: Transports, supervisor: Supervisor, doors: Doors | None) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(background, models.reload()))  # read the store now

    await models.reload()  # the store as it is: every model known (loading) before TorchServe has started
    await transports.start()
    if doors is not None:
        doors.start()
    supervisor.start()
    if config.watch_s > 0:
        _spawn(background, models.watch(config.watch_s))
    if config.auth.token_file:
        _spawn(background, tokens.watch())
    listen = config.listen
    log.info("front door: gRPC on %s:%d, HTTP on %s; model store %s%s", listen.host, transports.grpc_port,
             f"{listen.host}:{listen.http_port}" if transports.http else "off", config.model_store,
             f"; {listen.processes} processes" if doors else "")
    await stop.wait()
    for task in background:
        task.cancel()

    others = asyncio.create_task(doors.stop(config.shutdown.grace_s)) if doors else None
    await transports.stop()
    if others is not None:
        await others  # their requests still need TorchServe
    await supervisor.stop()
    await models.close()
    backend.close()
    log.info("stopped")
    return 1 if transports.failed else 0


def _spawn(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())


def _first_time(announce: Callable[[], None]) -> Callable[[bool], None]:
    """A readiness listener that runs `announce` once, after the log lines of the same moment."""
    done = False

    def listener(ready: bool) -> None:
        nonlocal done
        if ready and not done:
            done = True
            asyncio.get_running_loop().call_soon(announce)
    return listener
