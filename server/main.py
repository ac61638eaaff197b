"""`gradserve serve`: TorchServe on loopback (supervised), and the gRPC + REST front door in one event loop.

SIGTERM/SIGINT: report not ready, stop accepting, let in-flight requests finish within the grace period,
stop TorchServe, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from handlers.sharedmem import PayloadArea
from server import metrics
from server.auth import Tokens, check_exposure
from server.backend import Backend
from server.config import ServeConfig
from server.grpc_server import create_server
from server.lifecycle import ModelManager
from server.rest import create_app
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
         "token_expiration_min": "torchserve.token_expiration_min"}


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
    parser.add_argument("--token-expiration-min", type=float, default=None,
                        help="lifetime of TorchServe's internal keys (renewed before they expire)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    overrides = {field: getattr(args, flag, None) for flag, field in FLAGS.items()}
    return gradserve_config.load(ServeConfig, gradserve_config.default_path(args.config), "serve", overrides)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    configure_logging()
    return run(config, serve(config))


def run(config: ServeConfig, main: Coroutine[Any, Any, int]) -> int:
    """`main` to its end on the event loop `config` names."""
    factory = None
    if config.event_loop == "uvloop":
        import uvloop  # uvicorn[standard]'s, as its own servers use it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll is noise


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
    client = TorchServeClient(config.torchserve)
    models = ModelManager(store, client, config.default_versions, load_timeout_s=config.torchserve.ready_timeout_s)
    ts = config.torchserve
    backend = Backend(config, models, client, metrics.observe_batch,
                      PayloadArea.open(ts.shared_memory_dir, ts.shared_memory_min_bytes))
    backend.add_ready_listener(lambda ready: metrics.READY.set(int(ready)))
    metrics.label_models(models.knows)
    metrics.IN_FLIGHT.set_function(lambda: backend.in_flight)
    if on_ready is not None:
        backend.add_ready_listener(_first_time(on_ready))
    grpc_server, grpc_port = create_server(config, backend, tokens)
    http = _http_server(config, backend, tokens)
    supervisor = Supervisor(torchserve_config(config), client, config.torchserve, models.torchserve_started,
                            models.torchserve_stopped, metrics.RESTARTS.inc)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(background, models.reload()))  # read the store now

    await models.reload()  # the store as it is: every model known (loading) before TorchServe has started
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve()) if http else None
    failed: list[str] = []
    if http_task is not None:
        http_task.add_done_callback(lambda task: _http_ended(task, stop, failed))
    supervisor.start()
    if config.watch_s > 0:
        _spawn(background, models.watch(config.watch_s))
    if config.auth.token_file:
        _spawn(background, tokens.watch())
    listen = config.listen
    log.info("front door: gRPC on %s:%d, HTTP on %s; model store %s", listen.host, grpc_port,
             f"{listen.host}:{listen.http_port}" if http else "off", store)
    await stop.wait()
    for task in background:
        task.cancel()

    remaining = await _drain(config, backend)
    if http is not None:
        http.should_exit = True
    await asyncio.gather(grpc_server.stop(remaining), *([http_task] if http_task else []))
    await supervisor.stop()
    await models.close()
    backend.close()
    log.info("stopped")
    return 1 if failed else 0


async def _drain(config: ServeConfig, backend: Backend) -> float:
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


def _http_ended(task: asyncio.Task[None], stop: asyncio.Event, failed: list[str]) -> None:
    """The HTTP server ended: expected once `stop` is set; before that (its port taken, ...) the whole server
    stops, rather than serve gRPC alone while REST clients and probes fail."""
    if stop.is_set():
        return
    error = task.exception() if not task.cancelled() else None
    failed.append(str(error))
    log.error("the HTTP server ended (%s); stopping", error or "it could not start: see above")
    stop.set()


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
