"""The real stack for front-door tests: a run trained once, packaged by `gradserve package`, and
`gradserve serve` as a subprocess on free ports (TorchServe is its child).

This module imports no protobuf stubs, so both our tests and the tritonclient tests (tests/client/, run in
their own pytest process: the two sets of `inference` protos cannot share one) can use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from common import ROOT, free_port
from run_fixtures import digits, make_run, selected_model

GRADSERVE = Path(sys.executable).parent / "gradserve"
TOKEN = "test-token-7f3a"


@dataclass(frozen=True)
class Store:
    run: Path
    path: Path


_STORE: dict[str, Store] = {}


def built_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A model store with digits.mar, packaged by the CLI from a small real run; built once per session."""
    if "store" not in _STORE:
        base = tmp_path_factory.mktemp("frontdoor")
        run = make_run(base / "runs")
        subprocess.run([str(GRADSERVE), "package", "--run", str(run), "--model-store", str(base / "store")],
                       check=True, cwd=ROOT, capture_output=True, timeout=300)
        _STORE["store"] = Store(run, base / "store")
    return _STORE["store"]


@dataclass
class FrontDoor:
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

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gradserve serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.http_url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"front door not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the front door and wait; if it does not exit in time, kill its group and TorchServe's."""
        if self.process.poll() is None:
            torchserve = self.torchserve()
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
                if torchserve is not None and torchserve.is_running():
                    os.killpg(os.getpgid(torchserve.pid), signal.SIGKILL)  # the launcher gives it its own group
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(line for line in text.splitlines() if "TS_METRICS" not in line)[-8000:]


@contextmanager
def running_front_door(store: Path, workdir: Path, token: str | None = TOKEN, *extra: str,
                       ready_timeout: float = 180.0) -> Iterator[FrontDoor]:
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    log_path = workdir / "frontdoor.log"
    env = {**os.environ, "GRADSERVE_TOKEN": token or ""}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(GRADSERVE), "serve", "--config", os.devnull, "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--model-store", str(store),
             "--torchserve-workdir", str(workdir / "torchserve"), *extra],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    door = FrontDoor(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", workdir, log_path, token)
    try:
        door.wait_ready(ready_timeout)
        yield door
    finally:
        door.stop(signal.SIGTERM)


__all__ = ["TOKEN", "FrontDoor", "Store", "built_store", "digits", "running_front_door", "selected_model"]
