"""Several front-door processes on the same ports (`listen.processes`), for machines where one process's event
loop is the limit: the first process (`gradserve serve`, server/main.py) starts the others and keeps them
running; each answers gRPC and REST as the first does.

- Ports: every process's gRPC listener joins the port with SO_REUSEPORT, and the kernel spreads connections
  over them; the HTTP listening socket is the first process's, inherited, and whichever process is free
  accepts. A gRPC channel keeps to one process; many clients (or connections) spread.
- Models: only the first process runs TorchServe and reads the store. It sends the others its model table
  (server/lifecycle.py `snapshot`) and where TorchServe listens whenever either changes; each sends its
  predictions to TorchServe itself, with the keys from TorchServe's key file. A retired build is unloaded once
  no process has a request at it: each tells the first when its own requests there have ended.
- Readiness, draining: each process reports its own (health, /v2/health/ready); on SIGTERM the first stops the
  others, and TorchServe only after their accepted requests have finished. A process that dies is started
  again; one whose first process is gone (its control socket closed) stops.
- Metrics and the clients' shared-memory regions live in a folder they share (server/metrics.py
  `share_between_processes`, server/client_shm.py): /metrics in any process reports them all, and a region
  registered through one is used through any.

The control socket carries one JSON object per line: the first process sends `hello` (the configuration, the
shared folder, the HTTP socket's descriptor) and then `{"models", "torchserve"}` states, the first of them at
once; the other takes that one before it listens, and answers `{"started": pid}` once it does and
`{"idle": <build>}` for each retired build it no longer uses.

    python -m server.doors <control socket descriptor>    (started by the first process, never by hand)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradserve import config as gradserve_config
from server import metrics
from server.auth import Tokens
from server.config import ServeConfig
from server.frontdoor import Transports, configure_logging, data_plane, run
from server.lifecycle import ModelManager, Version
from server.torchserve.client import TorchServeClient

log = logging.getLogger("gradserve.doors")

LINE_LIMIT = 64 * 1024 * 1024  # a model table with many versions' manifests is one line
RESTART_BACKOFF_S = (1.0, 30.0)  # a process that died is started again after 1 s, doubling up to 30
HEALTHY_AFTER_S = 60.0  # one that ran this long before dying starts again after the first delay


@dataclass(frozen=True)
class SharedFolder:
    """The folder the front-door processes share: their metrics' files, and the clients' region registrations."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def regions(self) -> Path:
        return self.root / "regions"

    @classmethod
    def create(cls) -> SharedFolder:
        shared = cls(Path(tempfile.mkdtemp(prefix="gradserve-doors-")))
        shared.metrics.mkdir()
        shared.regions.mkdir()
        return shared


@dataclass
class _Door:
    number: int  # 2, 3, ...: the first process is 1
    process: subprocess.Popen[bytes] | None = None
    writer: asyncio.StreamWriter | None = None  # while it runs: the states go there
    idle: set[str] = field(default_factory=set)  # retired builds it has no request at


class Doors:
    """The other front-door processes, as the first one runs them."""

    def __init__(self, config: ServeConfig, models: ModelManager, client: TorchServeClient, grpc_port: int,
                 http_socket: socket.socket | None, shared: SharedFolder) -> None:
        listen = dataclasses.replace(config.listen, grpc_port=grpc_port)
        self._config = dataclasses.asdict(dataclasses.replace(config, listen=listen))
        self._models, self._client = models, client
        self._http_socket, self._shared = http_socket, shared
        self._doors = [_Door(n) for n in range(2, config.listen.processes + 1)]
        self._acks = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._send_pending = False

    def start(self) -> None:
        self._models.elsewhere = self.idle
        self._models.add_listener(self._changed)
        self._tasks = [asyncio.create_task(self._keep(door)) for door in self._doors]

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to each: it drains as the first does. One still running after the grace is killed."""
        self._stopping = True
        for door, task in zip(self._doors, self._tasks, strict=True):
            if door.process is not None and door.process.poll() is None:
                door.process.send_signal(signal.SIGTERM)
            else:
                task.cancel()  # waiting to start it again
        if not self._tasks:
            return
        _, running = await asyncio.wait(self._tasks, timeout=grace_s + 2)
        for door in self._doors:
            if running and door.process is not None and door.process.poll() is None:
                log.warning("front-door process %d did not stop within the grace; killing it", door.number)
                door.process.kill()
        for task in running:
            task.cancel()  # waiting to start one again, or for a killed one's exit status
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def idle(self, internal: str) -> None:
        """Until no other process has a request at the build `internal` (a process that died has none)."""
        async with self._acks:
            await self._acks.wait_for(lambda: all(internal in d.idle for d in self._doors if d.writer is not None))

    # --- the model table, as it changes ----------------------------------------------------------------------

    def _changed(self) -> None:
        if not self._send_pending:  # one message for the changes of one moment
            self._send_pending = True
            asyncio.get_running_loop().call_soon(self._send)

    def _state(self) -> bytes:
        return _line({"models": self._models.snapshot(), "torchserve": self._client.shared()})

    def _send(self) -> None:
        self._send_pending = False
        state = self._state()
        live = self._models.live_builds()
        for door in self._doors:
            door.idle -= live  # a build served again must be retired again before it is unloaded
            if door.writer is not None:
                door.writer.write(state)

    # --- keeping each process running ------------------------------------------------------------------------

    async def _keep(self, door: _Door) -> None:
        delay = RESTART_BACKOFF_S[0]
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            try:
                code = await self._run(door)
            except Exception:  # noqa: BLE001 - whatever went wrong, the process is started again
                log.exception("front-door process %d failed", door.number)
                code = None
            if self._stopping:
                return
            delay = RESTART_BACKOFF_S[0] if loop.time() - started > HEALTHY_AFTER_S else delay
            log.error("front-door process %d ended (exit code %s); starting it again in %.0f s", door.number, code,
                      delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_S[1])

    async def _run(self, door: _Door) -> int | None:
        """One life of a process: start it, tell it what it needs, follow it until it exits; its exit code."""
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno()] + ([self._http_socket.fileno()] if self._http_socket is not None else [])
        try:
            # Not the event loop's own spawning: uvloop's forks, and gRPC's fork handlers then log a warning; this
            # one uses vfork. Its exit is waited for in a thread.
            door.process = subprocess.Popen([sys.executable, "-m", "server.doors", str(theirs.fileno())],
                                            pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        writer.write(_line({"hello": {
            "number": door.number, "config": self._config, "shared": str(self._shared.root),
            "http_fd": self._http_socket.fileno() if self._http_socket is not None else None}}))
        writer.write(self._state())  # the table it starts with, before it listens
        door.writer = writer  # every change from here on, and its requests count for unloading
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "started" in message:  # it listens
                    log.info("front-door process %d (pid %d) listens", door.number, door.process.pid)
                else:
                    door.idle.add(message["idle"])
                    await self._notify()
        finally:
            door.writer = None
            door.idle.clear()
            writer.close()
            code = await asyncio.to_thread(door.process.wait)
            metrics.process_ended(door.process.pid, str(self._shared.metrics))
            await self._notify()
        return code

    async def _notify(self) -> None:
        async with self._acks:
            self._acks.notify_all()


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# --- a further process -------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    hello = json.loads(_read_line(control))["hello"]
    configure_logging(f"[door {hello['number']}]")
    config = gradserve_config.build(ServeConfig, hello["config"], env={})  # exactly the first process's
    shared = SharedFolder(Path(hello["shared"]))
    metrics.share_between_processes(str(shared.metrics))
    return run(config, follow(config, control, shared, hello["http_fd"]))


def _read_line(control: socket.socket) -> bytes:
    """The hello, read a byte at a time: nothing after it may be taken from the socket before the event loop."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = control.recv(1)
        if not byte:
            raise SystemExit("the first front-door process went away before it said hello")
        line += byte
    return bytes(line)


async def follow(config: ServeConfig, control: socket.socket, shared: SharedFolder, http_fd: int | None) -> int:
    """Serve as the first process says, until SIGTERM/SIGINT or until it is gone."""
    client = TorchServeClient(config.torchserve)
    models = ModelManager(Path(config.model_store), client)
    backend = data_plane(config, models, client, shared.regions)
    tokens = Tokens(config.auth)
    stop = asyncio.Event()
    http_socket = socket.socket(fileno=http_fd) if http_fd is not None else None
    transports = Transports(config, backend, tokens, stop, http_socket, share_port=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the first process reads the store again; we follow it
    reader, writer = await asyncio.open_unix_connection(sock=control, limit=LINE_LIMIT)
    follower = _Follower(models, client, writer)
    await follower.take(await reader.readline())  # the model table first: no request may find it empty
    await transports.start()
    tasks = [asyncio.create_task(follower.run(reader)),
             *([asyncio.create_task(tokens.watch())] if config.auth.token_file else [])]
    tasks[0].add_done_callback(lambda task: _first_gone(task, stop))
    writer.write(_line({"started": os.getpid()}))
    await stop.wait()
    await transports.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.stop()
    backend.close()
    return 1 if transports.failed else 0


class _Follower:
    """Takes each state the first process sends; tells it when a retired build has no request here."""

    def __init__(self, models: ModelManager, client: TorchServeClient, writer: asyncio.StreamWriter) -> None:
        self._models, self._client, self._writer = models, client, writer
        self._reported: set[str] = set()  # retired builds being (or already) reported
        self._waiting: set[asyncio.Task[None]] = set()

    async def run(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            await self.take(line)
        log.warning("the first front-door process is gone; stopping")

    async def take(self, line: bytes) -> None:
        if not line:
            raise ConnectionError("the first front-door process went away before it sent the model table")
        state = json.loads(line)
        await self._client.follow(state["torchserve"])
        for loaded in self._models.mirror(state["models"]):
            if loaded.internal not in self._reported:
                self._reported.add(loaded.internal)
                task = asyncio.create_task(self._report_idle(loaded))
                self._waiting.add(task)
                task.add_done_callback(self._waiting.discard)
        self._reported -= self._models.live_builds()

    async def _report_idle(self, loaded: Version) -> None:
        await loaded.idle.wait()
        self._writer.write(_line({"idle": loaded.internal}))


def _first_gone(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """The control socket closed (the first process is gone: so are we), or following it failed."""
    if not task.cancelled() and task.exception() is not None:
        log.error("following the first front-door process failed; stopping", exc_info=task.exception())
    stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

