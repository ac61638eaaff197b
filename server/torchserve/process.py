"""Start and stop one TorchServe (Java) process on loopback, with token auth on and the model API off.

    torchserve = TorchServe(TorchServeConfig(model_store="model_store", workdir="logs/torchserve",
                                             models=("digits.mar",))).start()
    await wait_until_ready(torchserve)        # server/torchserve/client.py: everything that talks to it
    ...
    torchserve.stop()

Each instance lives in its own workdir: config.properties, key_file.json (TorchServe writes it in its cwd),
torchserve.log, logs/, and tmp/ (TorchServe's pid file and worker sockets go to the temp dir, so several
instances can run side by side). Ports left at 0 are picked free on 127.0.0.1 before the start. This file
only starts, watches and stops the process; it never talks to TorchServe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from gradserve.config import ENV_TOKEN
from gradserve.net import free_ports

LOG_CONFIG = Path(__file__).with_name("log4j2.xml")
# Set for the workers of a TorchServe that runs LOG_CONFIG, which drops the metric line a worker prints for every
# call: the handler then does not print it at all (handlers/handler.py reads the same name).
QUIET_METRICS_ENV = "GRADSERVE_QUIET_WORKER_METRICS"


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
    number_of_gpu: int | None = None      # None: TorchServe's default (every GPU nvidia-smi lists); 0: CPU only
    max_request_size: int = 64 * 1024 * 1024
    enable_metrics_api: bool = False
    enable_model_api: bool = False        # the front door turns it on to load and unload archives itself
    log_config: Path | None = LOG_CONFIG  # None: TorchServe's own log4j2.xml (several lines per request)
    jvm_options: tuple[str, ...] = ()     # after jvm_options()'s: a property set in both takes this one

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_store", Path(self.model_store).resolve())
        object.__setattr__(self, "workdir", Path(self.workdir).resolve())
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "jvm_options", tuple(self.jvm_options))


@dataclass(frozen=True)
class Endpoint:
    """Where a started TorchServe listens, and the key file it writes."""

    grpc_target: str  # "127.0.0.1:<grpc inference port>"
    management_url: str  # "http://127.0.0.1:<management port>"
    inference_url: str  # "http://127.0.0.1:<inference port>"
    key_file: Path


def jvm_options() -> list[str]:
    """Our options for TorchServe's JVM. Its worker threads hand each call to their Python worker through
    `CompletableFuture.runAsync` on the common ForkJoinPool, whose parallelism is the JVM's cores - 1. At 1 (2
    cores, or a container limited to 2 CPUs) Java runs each such task on a thread of its own: TorchServe started
    and ended a thread for every call (JFR: 2526 in 10 s at 253 calls/s). At least 2 keeps the pool's threads."""
    return [f"-Djava.util.concurrent.ForkJoinPool.common.parallelism={max(2, len(os.sched_getaffinity(0)) - 1)}"]


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
        self.config = _with_free_ports(self.config)
        workdir = self.config.workdir
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.endpoint.key_file.unlink(missing_ok=True)
        self._log_starts = {p: p.stat().st_size if p.exists() else 0 for p in (self.ts_log_path, self.model_log_path)}
        properties = workdir / "config.properties"
        properties.write_text(self.properties())
        # Not the clients' token: TorchServe and its workers (which run the model's code) never need it. Nor the
        # front door's metrics folder (server/metrics.py): a handler using prometheus_client would write there.
        private = (ENV_TOKEN, "PROMETHEUS_MULTIPROC_DIR")
        env = {**{k: v for k, v in os.environ.items() if k not in private}, "TEMP": str(workdir / "tmp"),
               "TMPDIR": str(workdir / "tmp"),
               "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"),
               **({QUIET_METRICS_ENV: "1"} if self.config.log_config == LOG_CONFIG else {})}
        with open(self.log_path, "ab") as log:
            # Through server/torchserve/guard.py: TorchServe goes down with this process even if it is SIGKILLed.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.torchserve.guard",
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
            # The front door loads and unloads archives while it runs (new versions, a changed store). The API
            # answers on loopback only, to the management key only this process reads, and loads only archives
            # in the model store: no URL matches allowed_urls, so nothing is ever downloaded.
            "enable_model_api": str(c.enable_model_api).lower(),
            "allowed_urls": "^gradserve-loads-local-archives-only$",
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
        lines["vmargs"] = " ".join([*jvm_options(), *c.jvm_options])
        if c.number_of_gpu is not None:
            lines["number_of_gpu"] = c.number_of_gpu
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` seconds; always."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        # The frontend's python workers share the group; none may outlive it.
        _signal_group(self.process.pid, signal.SIGKILL)
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        finally:
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
    def endpoint(self) -> Endpoint:
        c = self.config
        return Endpoint(f"{c.host}:{c.grpc_inference_port}", f"http://{c.host}:{c.management_port}",
                        f"http://{c.host}:{c.inference_port}", c.workdir / "key_file.json")

    @property
    def model_names(self) -> list[str]:
        """The names TorchServe registers the loaded archives under."""
        return [archive_model_name(self.config.model_store / m) for m in self.config.models]

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

    def log_since_start(self, path: Path) -> str:
        """What `path` (ts_log_path or model_log_path) gained since this start."""
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self._log_starts.get(path, 0))
            return f.read().decode(errors="replace")


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
    return archive_entry(path)[0]


def archive_entry(path: Path) -> tuple[str, int]:
    """What TorchServe reads of an archive to register it: the model name (MAR-INF/MANIFEST.json) and the workers
    it asks for (minWorkers of its model-config.yaml, `package.min_workers`; without one, one per core of this
    machine, as TorchServe does)."""
    with zipfile.ZipFile(path) as z:
        model = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        config_file = model.get("configFile")
        config = yaml.safe_load(z.read(config_file)) if config_file in z.namelist() else None
    workers = config.get("minWorkers") if isinstance(config, dict) else None
    per_core = len(os.sched_getaffinity(0))
    return model["modelName"], workers if isinstance(workers, int) and workers >= 1 else per_core


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _with_free_ports(config: TorchServeConfig) -> TorchServeConfig:
    names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")
    free = iter(free_ports(config.host, len(names)))
    return replace(config, **{n: getattr(config, n) or next(free) for n in names})
