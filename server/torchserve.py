"""Start, watch and stop one TorchServe (Java) process on loopback, with token auth on and the model API off.

    with TorchServe(TorchServeConfig(model_store="model_store", workdir="logs/torchserve",
                                     models=("digits.mar",))) as ts:
        ts.wait_ready(120)
        channel = grpc.insecure_channel(ts.grpc_inference_target)
        metadata = [("authorization", f"Bearer {ts.read_keys().inference}")]

Each instance lives in its own workdir: config.properties, key_file.json (TorchServe writes it in its cwd),
torchserve.log, logs/, and tmp/ (TorchServe's pid file and worker sockets go to the temp dir, so several
instances can run side by side). Ports left at 0 are picked free on 127.0.0.1 before the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from server.generated import torchserve_pb2_grpc

LOG_CONFIG = Path(__file__).with_name("torchserve-log4j2.xml")


@dataclass(frozen=True)
class TorchServeConfig:
    model_store: Path
    workdir: Path
    models: tuple[str, ...] = ()          # archive file names in model_store, loaded at start
    host: str = "127.0.0.1"
    inference_port: int = 0               # 0: pick a free port
    management_port: int = 0
    metrics_port: int = 0
    grpc_inference_port: int = 0
    grpc_management_port: int = 0
    token_expiration_min: float = 60.0
    job_queue_size: int = 1000            # requests queued per model before TorchServe answers 503
    netty_threads: int = 0                # 0: TorchServe's default (number of cores)
    max_request_size: int = 64 * 1024 * 1024
    enable_metrics_api: bool = False
    log_config: Path | None = LOG_CONFIG  # None: TorchServe's own log4j2.xml (several lines per request)
    max_load_failures: int = 3            # a model's worker failing to load this often at start: give up

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_store", Path(self.model_store).resolve())
        object.__setattr__(self, "workdir", Path(self.workdir).resolve())
        object.__setattr__(self, "models", tuple(self.models))


@dataclass(frozen=True)
class TorchServeKeys:
    inference: str
    management: str
    expires: datetime  # the earlier expiry of the two; renew_keys() before it passes


class TorchServeError(RuntimeError):
    """TorchServe is missing, failed to start, or did not become ready; the message says what to do."""


class TorchServe:
    """One TorchServe child process in its own process group; `config` holds the ports it really uses."""

    def __init__(self, config: TorchServeConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._log_starts: dict[Path, int] = {}  # where this start's lines begin in logs/ (they outlive restarts)

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> TorchServe:
        check_java()
        executable = Path(sys.executable).parent / "torchserve"
        if not executable.exists():
            raise TorchServeError(f"{executable} not found: install torchserve==0.12.0 into this environment")
        missing = [m for m in self.config.models if not (self.config.model_store / m).is_file()]
        if missing:
            raise TorchServeError(f"archives {missing} not in {self.config.model_store}: run gradserve package")
        self.config = _withfree_ports(self.config)
        workdir = self.config.workdir
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        (workdir / "key_file.json").unlink(missing_ok=True)
        self._log_starts = {p: p.stat().st_size if p.exists() else 0 for p in (self.ts_log_path, self.model_log_path)}
        properties = workdir / "config.properties"
        properties.write_text(self.properties())
        env = {**os.environ, "TEMP": str(workdir / "tmp"), "TMPDIR": str(workdir / "tmp"),
               "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs")}
        with open(self.log_path, "ab") as log:
            # Through server/ts_guard.py: TorchServe goes down with this process even if it is SIGKILLed.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.ts_guard",
                 str(executable), "--start", "--foreground", "--ncs", "--ts-config", str(properties),
                 "--model-store", str(self.config.model_store),
                 *(["--log-config", str(self.config.log_config)] if self.config.log_config else [])],
                cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def properties(self) -> str:
        c = self.config
        lines = {
            "inference_address": f"http://{c.host}:{c.inference_port}",
            "management_address": f"http://{c.host}:{c.management_port}",
            "metrics_address": f"http://{c.host}:{c.metrics_port}",
            "grpc_inference_address": c.host,
            "grpc_inference_port": c.grpc_inference_port,
            "grpc_management_address": c.host,
            "grpc_management_port": c.grpc_management_port,
            "model_store": c.model_store,
            "load_models": ",".join(c.models) if c.models else "",
            "enable_model_api": "false",
            "disable_token_authorization": "false",
            "token_expiration_min": c.token_expiration_min,
            "enable_metrics_api": str(c.enable_metrics_api).lower(),
            "disable_system_metrics": "true",
            "install_py_dep_per_model": "false",
            "job_queue_size": c.job_queue_size,
            "max_request_size": c.max_request_size,
            "max_response_size": c.max_request_size,
            # Worker sockets are named after this port; a random one keeps instances apart.
            "initial_worker_port": free_ports(c.host, 1)[0],
        }
        if c.netty_threads:
            lines["number_of_netty_threads"] = c.netty_threads
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until TorchServe answers gRPC Ping as Healthy and every loaded model has a READY worker."""
        deadline = time.monotonic() + timeout
        names = [archive_model_name(self.config.model_store / m) for m in self.config.models]
        problem = "not started"
        while time.monotonic() < deadline:
            if not self.alive:
                raise TorchServeError(f"TorchServe exited (code {self.returncode}); last lines of "
                                      f"{self.log_path}:\n{self.log_tail()}")
            problem = self._not_ready(names)
            if problem is None:
                return
            self._check_loads(names)
            time.sleep(0.25)
        raise TorchServeError(f"TorchServe not ready after {timeout:.0f}s ({problem}); last lines of "
                              f"{self.model_log_path}:\n{self.log_tail(15, self.model_log_path)}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` seconds; always."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        # The frontend's python workers share the group; none may outlive it.
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdin is not None:
            self.process.stdin.close()  # the guard's pipe

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what callers read -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.config.host}:{self.config.grpc_inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.config.host}:{self.config.management_port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.config.host}:{self.config.inference_port}"

    @property
    def log_path(self) -> Path:
        return self.config.workdir / "torchserve.log"

    @property
    def ts_log_path(self) -> Path:
        return self.config.workdir / "logs" / "ts_log.log"

    @property
    def model_log_path(self) -> Path:
        """Where the handler's log lines (python worker stdout/stderr) end up."""
        return self.config.workdir / "logs" / "model_log.log"

    def log_tail(self, lines: int = 30, path: Path | None = None) -> str:
        """The last lines of TorchServe's log (or of `path`, e.g. model_log_path), without metric lines."""
        path = path or self.log_path
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if "TS_METRICS" not in line][-lines:])

    def read_keys(self) -> TorchServeKeys:
        """The inference and management tokens TorchServe wrote into key_file.json in its workdir."""
        keys = json.loads((self.config.workdir / "key_file.json").read_text())
        expires = min(datetime.fromisoformat(keys[k]["expiration time"]) for k in ("inference", "management"))
        return TorchServeKeys(inference=keys["inference"]["key"], management=keys["management"]["key"],
                              expires=expires)

    def renew_keys(self) -> TorchServeKeys:
        """Have TorchServe issue fresh inference and management tokens (they expire after
        token_expiration_min); TorchServe rewrites key_file.json, which is read back."""
        api_key = json.loads((self.config.workdir / "key_file.json").read_text())["API"]["key"]
        for kind in ("inference", "management"):
            request = urllib.request.Request(f"{self.management_url}/token?type={kind}",
                                             headers={"Authorization": f"Bearer {api_key}"})
            with urllib.request.urlopen(request, timeout=10):
                pass
        return self.read_keys()

    def load_failures(self, model_names: list[str]) -> dict[str, int]:
        """How often each model's worker has died and been retried since this start (TorchServe logs
        "Retry worker" from the worker's thread, named W-<port>-<model>_<version>)."""
        retried = re.findall(r" W-\d+-(.+?)_[^ _]+ \S+ - Retry worker", self._since_start(self.ts_log_path))
        return {name: retried.count(name) for name in model_names}

    def load_error(self, model_name: str) -> str:
        """The worker's last word on why `model_name` did not load, since this start ("" if it said none)."""
        text = self._since_start(self.model_log_path)
        said = re.findall(rf"Failed to load model {re.escape(model_name)}, exception (.*)", text)
        said = said or re.findall(r"MODEL_LOG - ((?:\w+\.)*\w*(?:Error|Exception): .*)", text)
        return said[-1].strip() if said else ""

    def _since_start(self, path: Path) -> str:
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self._log_starts.get(path, 0))
            return f.read().decode(errors="replace")

    def _check_loads(self, model_names: list[str]) -> None:
        """A model whose worker keeps dying while it loads (a broken archive, a handler that raises) will not
        come up by waiting: say so now, with the worker's own words, instead of when the timeout runs out."""
        for name, failures in self.load_failures(model_names).items():
            if failures >= self.config.max_load_failures:
                raise TorchServeError(
                    f"model {name!r}: its worker failed to load {failures} times (TorchServe keeps retrying): "
                    f"{self.load_error(name) or 'it gave no reason'}. Fix or remove its archive; the worker's log "
                    f"is {self.model_log_path}")

    def _not_ready(self, model_names: list[str]) -> str | None:
        """None when ready, else what is still missing."""
        try:
            keys = self.read_keys()
        except (OSError, ValueError, KeyError):
            return "key_file.json not written yet"
        try:
            with grpc.insecure_channel(self.grpc_inference_target) as channel:
                stub = torchserve_pb2_grpc.InferenceAPIsServiceStub(channel)
                health = stub.Ping(empty_pb2.Empty(), timeout=2,
                                   metadata=[("authorization", f"Bearer {keys.inference}")]).health
        except grpc.RpcError as e:
            return f"gRPC Ping failed: {e.code().name}"
        if "Healthy" not in health:
            return f"Ping says {health.strip()}"
        for name in model_names:
            request = urllib.request.Request(f"{self.management_url}/models/{name}",
                                             headers={"Authorization": f"Bearer {keys.management}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    versions = json.load(response)
            except (urllib.error.URLError, OSError, ValueError) as e:
                return f"describing model {name} failed: {e}"
            if not any(w.get("status") == "READY" for v in versions for w in v.get("workers", [])):
                return f"model {name} has no READY worker yet"
        return None


def check_java() -> None:
    """TorchServe 0.12 needs Java 17 or newer on PATH (or in JAVA_HOME)."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    hint = "TorchServe needs Java 17: install it with `apt-get install openjdk-17-jre-headless`"
    if not java or not Path(java).exists():
        raise TorchServeError(f"java not found; {hint}")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    match = re.search(r'version "(\d+)', out.stderr + out.stdout)
    if not match or int(match.group(1)) < 17:
        raise TorchServeError(f"{java} is not Java 17+ ({(out.stderr or out.stdout).strip()[:80]}); {hint}")


def archive_model_name(path: Path) -> str:
    """The model name TorchServe registers for an archive (MAR-INF/MANIFEST.json)."""
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def free_ports(host: str, count: int) -> list[int]:
    """Distinct free ports: all sockets stay bound until every port is known."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _withfree_ports(config: TorchServeConfig) -> TorchServeConfig:
    names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")
    free = iter(free_ports(config.host, len(names)))
    return replace(config, **{n: getattr(config, n) or next(free) for n in names})
