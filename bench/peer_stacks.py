"""The peer servers `gradserve bench --peers` measures beside gradserve, each a process of its own venv
(bench/.peers/<peer>/, made by `make bench-peers`) serving the same archive's model over the Open Inference
Protocol v2 (bench/peers/). Started on free loopback ports, waited on by polling readiness, stopped with
everything they started when their block ends.

    with running_peer(PEERS["mlserver"], archive, workdir) as peer:   # peer.grpc_target, peer.http_url
        ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import yaml

from bench.stacks import wait_or_kill
from gradserve.errors import UsageError
from gradserve.net import free_ports
from handlers.manifest import Manifest
from handlers.threads import Threads

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".peers"


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # run as `python -m module` in the peer's venv
    what: str  # the version and its batching, for the report


PEERS = {p.name: p for p in (
    Peer("mlserver", "bench.peers.mlserver_peer", "MLServer 1.7.1, adaptive batching 32 requests / 5 ms"),
    Peer("kserve", "bench.peers.kserve_peer", "KServe 0.21.0 Python model server, no batching"),
    Peer("triton", "bench.peers.triton_peer", "PyTriton 0.7.0 (Triton 2.51), dynamic batching 32 / 2 ms"),
)}


def python_of(peer: Peer, venvs: Path = VENVS) -> Path:
    return venvs / peer.name / "bin" / "python"


def select(names: list[str], venvs: Path = VENVS) -> tuple[list[Peer], list[str]]:
    """The peers named whose venv exists, and a line for each one that is missing (how to make it)."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise UsageError(f"unknown peer(s) {', '.join(unknown)}: choose among {', '.join(PEERS)}")
    found, missing = [], []
    for name in names:
        if (venvs / name / ".installed").exists() and python_of(PEERS[name], venvs).exists():
            found.append(PEERS[name])
        else:
            missing.append(f"peer {name}: no venv in {venvs / name}; create it with `make bench-peers` "
                           "(the bench runs without it)")
    return found, missing


@dataclass
class PeerServer:
    peer: Peer
    model: str
    process: subprocess.Popen[bytes]
    grpc_target: str
    http_url: str
    log_path: Path

    def wait_ready(self, timeout: float) -> None:
        """REST says the model is ready, then the gRPC port answers."""
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/models/{self.model}/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    with grpc.insecure_channel(self.grpc_target) as channel:
                        grpc.channel_ready_future(channel).result(max(1.0, deadline - time.monotonic()))
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.peer.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metadata(self) -> dict[str, Any]:
        """The server's own name and version (GET /v2), for the report."""
        try:
            answer = httpx.get(f"{self.http_url}/v2", timeout=5).json()
        except (httpx.HTTPError, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"name": answer.get("name"), "version": answer.get("version")}

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its process group, then SIGKILL to what is left of it and of its descendants."""
        if self.process.poll() is not None:
            return
        descendants = psutil.Process(self.process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        if wait_or_kill(self.process, timeout, descendants):
            for p in descendants:  # workers that outlive their server (MLServer's, Triton's stub)
                with contextlib.suppress(psutil.Error):
                    p.kill()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_peer(peer: Peer, archive: Path, workdir: Path) -> PeerServer:
    """The peer's server for `archive` (unpacked into workdir/model) on free ports, its log in workdir/peer.log;
    its model runs on the threads a lone worker of the archive's handler would use (handlers/threads.py)."""
    model_dir = workdir / "model"
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(model_dir)
    name = Manifest.read(model_dir).name
    # A peer runs one instance of the model: it gets the threads of a lone worker (the whole machine's share).
    shipped = yaml.safe_load((model_dir / "model-config.yaml").read_text()) or {}
    threads = Threads.from_config({**shipped, "maxWorkers": 1})
    http_port, grpc_port, metrics_port = free_ports("127.0.0.1", 3)
    log_path = workdir / "peer.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    command = [str(python_of(peer)), "-m", peer.module, "--model-dir", str(model_dir), "--name", name,
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--workdir", str(workdir), "--threads", str(threads.most),
               "--parallel-rows", str(threads.parallel_rows)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return PeerServer(peer, name, process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", log_path)


@contextlib.contextmanager
def running_peer(peer: Peer, archive: Path, workdir: Path, ready_timeout: float = 240.0) -> Iterator[PeerServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_peer(peer, archive, workdir)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
