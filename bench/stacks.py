"""The stacks the bench and the tests start: `gradserve serve` as a child process (the front door with its own
TorchServe), and TorchServe alone. Each starts on free loopback ports, is waited on by polling its readiness,
and is stopped, with everything it started, when its block ends, whatever happened.

    with running_front_door(store, workdir, token="t") as door:     # door.grpc_target, door.http_url
        ...
    with running_torchserve(store, workdir) as (torchserve, keys):   # TorchServe's own gRPC/REST and key
        ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from gradserve.config import ENV_TOKEN
from gradserve.net import free_ports
from server.torchserve.client import Keys, wait_until_ready
from server.torchserve.process import TorchServe, TorchServeConfig

GRADSERVE = Path(sys.executable).parent / "gradserve"


def wait_or_kill(process: subprocess.Popen[bytes], timeout: float, descendants: list[psutil.Process]) -> bool:
    """Wait `timeout` seconds for a signalled `process`; True if it exited. If not, SIGKILL its process group and
    `descendants` (what it had started, which may have left the group), and False."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                p.kill()
        return False


@dataclass
class FrontDoor:
    """A running `gradserve serve` and how to reach it."""

    process: subprocess.Popen[bytes]
    grpc_target: str
    http_url: str
    workdir: Path
    log_path: Path
    token: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def torchserve(self) -> psutil.Process | None:
        """The TorchServe (java) child of the front door, if one runs."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if "java" in child.name():
                return child
        return None

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.http_url}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gradserve serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"front door not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the front door and wait; if it does not exit in time, kill its group and TorchServe's (which
        the launcher gives a group of its own), and anything else it left."""
        if self.process.poll() is None:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
            torchserve = self.torchserve()
            self.process.send_signal(sig)
            exited = wait_or_kill(self.process, timeout, descendants)
            if not exited and torchserve is not None and torchserve.is_running():  # TorchServe's own group
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    os.killpg(os.getpgid(torchserve.pid), signal.SIGKILL)
        return self.process.returncode

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the front door's log (TorchServe's metric lines left out)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join([line for line in text.splitlines() if "TS_METRICS" not in line][-lines:])


def start_front_door(store: Path, workdir: Path, token: str | None = None, *extra: str,
                     config: str = os.devnull, env: Mapping[str, str] | None = None) -> FrontDoor:
    """`gradserve serve` on free ports, its log in workdir/frontdoor.log; the token goes in the environment,
    as a deployment would pass it (never on a command line, where `ps` shows it). `env` adds to the environment."""
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_ports("127.0.0.1", 2)
    log_path = workdir / "frontdoor.log"
    env = {**os.environ, **(env or {}), ENV_TOKEN: token or ""}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(GRADSERVE), "serve", "--config", config, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--model-store", str(store),
             "--torchserve-workdir", str(workdir / "torchserve"), *extra],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    return FrontDoor(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", workdir, log_path, token)


@contextlib.contextmanager
def running_front_door(store: Path, workdir: Path, token: str | None = None, *extra: str, config: str = os.devnull,
                       ready_timeout: float = 180.0, env: Mapping[str, str] | None = None) -> Iterator[FrontDoor]:
    door = start_front_door(store, workdir, token, *extra, config=config, env=env)
    try:
        door.wait_ready(ready_timeout)
        yield door
    finally:
        door.stop(signal.SIGTERM)


@contextlib.contextmanager
def running_torchserve(store: Path, workdir: Path, models: tuple[str, ...] = ("digits.mar",),
                       timeout: float = 180.0) -> Iterator[tuple[TorchServe, Keys]]:
    """TorchServe alone (token auth on, model API off) and the keys it wrote, once it serves `models`."""
    torchserve = TorchServe(TorchServeConfig(model_store=store, workdir=workdir, models=models))
    try:
        torchserve.start()
        # In a thread of its own: callers may be inside an event loop (the bench) or not (tests).
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            keys = thread.submit(asyncio.run, wait_until_ready(torchserve, timeout)).result()
        yield torchserve, keys
    finally:
        torchserve.stop()
