"""`gradserve bench`: every way into one model archive, measured side by side in one run.

    gradserve bench --run runs/digits [--quick] [--seconds 5] [--profile]

First the raw forward and the handler in-process (bench/handler_throughput.py; the raw ceiling is the best
wall-clock rows/s of the plain forward). Then three stacks run side by side: TorchServe with its best direct
setting (batchSize 32, maxBatchDelay 5 ms, one worker), TorchServe with batching off (batchSize 1, for the
latency at concurrency 1), both hit directly over gRPC Predictions and REST, and the front door (`gradserve
serve`, which starts its own TorchServe) over gRPC ModelInfer, ModelStreamInfer and REST JSON. The windows go
scenario by scenario (SCENARIOS), every target in turn, so that neighbouring windows share the machine's
drifting load; each runs the closed-loop load generator of bench/loadgen.py (in this process) after a warm-up,
and is repeated when other processes used more than --max-other-cores (at most --max-attempts times, the
quietest kept). Last, a `gradserve batch` job against a raw forward over the same rows. Writes
<out>/<date>.json, .md (tables and the issue's ratios) and .png, and the latest table into bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import psutil

from bench import handler_throughput, loadgen
from gradserve.config import build, load_file

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GRADSERVE = Path(sys.executable).parent / "gradserve"


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    rows: int  # rows per request


SCENARIOS = (Scenario("c1", 1, 1), Scenario("c16", 16, 1), Scenario("c64", 64, 1), Scenario("rows256_c8", 8, 256))
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class BenchConfig:
    run: Path
    out_dir: Path = RESULTS
    seconds: float = 5.0  # measuring window per target and scenario
    warmup_s: float = 1.0
    jvm_warmup_s: float = 10.0  # c=64 per way before the first window: TorchServe's JVMs compile their hot paths
    in_process_s: float = 1.0  # per row count and path in bench/handler_throughput.py
    batch_rows: int = 20480
    max_other_cores: float = 0.3  # CPU used by processes not under test, in cores, before a window is repeated
    max_attempts: int = 2
    frontdoor_archive: str = ""  # how the front door's archive batches (gradserve.yaml's package: section)
    serve_config: str = os.devnull  # gradserve.yaml for the front door (its serve: section: coalescing, ...)
    profile: bool = False  # py-spy the front door under frontdoor_grpc c64
    label: str = ""


# --- processes under test and their CPU ------------------------------------------------------------------------

def roles(root: psutil.Process | None, root_role: str) -> dict[str, list[psutil.Process]]:
    """The load generator (this process), the root under test and its descendants, by what they are."""
    found: dict[str, list[psutil.Process]] = {"loadgen": [psutil.Process()]}
    if root is None:
        return found
    found[root_role] = [root]
    for child in root.children(recursive=True):
        try:
            name, cmdline = child.name(), " ".join(child.cmdline())
        except psutil.Error:
            continue
        role = "ts_java" if "java" in name else "ts_worker" if "model_service_worker" in cmdline else "ts_launcher"
        found.setdefault(role, []).append(child)
    return found


class CpuMeter:
    """CPU seconds of each role over a window, and the cores everything else on the machine used meanwhile."""

    def __init__(self, processes: dict[str, list[psutil.Process]]) -> None:
        self.processes = processes

    def _sample(self) -> tuple[float, dict[str, float], float]:
        cpu: dict[str, float] = {}
        for role, procs in self.processes.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            cpu[role] = total
        system = psutil.cpu_times()
        busy = sum(system) - system.idle - getattr(system, "iowait", 0.0)
        return time.perf_counter(), cpu, busy

    def __enter__(self) -> CpuMeter:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        (t0, cpu0, busy0), (t1, cpu1, busy1) = self.start, self._sample()
        self.cpu_s = {role: round(cpu1[role] - cpu0[role], 3) for role in cpu1}
        self.other_cores = max(0.0, (busy1 - busy0 - sum(self.cpu_s.values())) / (t1 - t0))


# --- the stacks ---------------------------------------------------------------------------------------------------

@dataclass
class FrontDoor:
    process: subprocess.Popen[bytes]
    grpc_target: str
    http_url: str
    token: str


@contextmanager
def running_torchserve(store: Path, workdir: Path) -> Iterator[Any]:
    from server.torchserve import TorchServe, TorchServeConfig

    torchserve = TorchServe(TorchServeConfig(model_store=store, workdir=workdir, models=("digits.mar",)))
    try:
        torchserve.start()
        torchserve.wait_ready(180)
        yield torchserve
    finally:
        torchserve.stop()


@contextmanager
def running_front_door(store: Path, workdir: Path, serve_config: str) -> Iterator[FrontDoor]:
    from server.torchserve import free_ports

    grpc_port, http_port = free_ports("127.0.0.1", 2)
    token = secrets.token_hex(12)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "frontdoor.log", "ab") as log:
        process = subprocess.Popen(
            [str(GRADSERVE), "serve", "--config", serve_config, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--model-store", str(store), "--torchserve-workdir",
             str(workdir / "torchserve")],
            cwd=workdir, env={**os.environ, "GRADSERVE_TOKEN": token}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    door = FrontDoor(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", token)
    try:
        deadline = time.monotonic() + 240
        while not _ready(door):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "frontdoor.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the front door did not become ready (exit {process.poll()}):\n{tail}")
            time.sleep(0.3)
        yield door
    finally:
        _stop(process)


def _ready(door: FrontDoor) -> bool:
    try:
        return httpx.get(f"{door.http_url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def backend_calls(door: FrontDoor) -> tuple[float, float]:
    """The front door's calls to TorchServe so far and the rows they carried (its Prometheus histogram)."""
    text = httpx.get(f"{door.http_url}/metrics", headers={"authorization": f"Bearer {door.token}"}, timeout=5).text
    found = dict(re.findall(r'^gradserve_backend_batch_rows_(count|sum)\{model="digits"\} (\S+)$', text, re.M))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the front door stops its TorchServe), then SIGKILL of whatever is left of its groups."""
    if process.poll() is None:
        descendants = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        for p in descendants:
            if p.is_running():
                p.kill()


# --- measuring ----------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, config: BenchConfig, rows: np.ndarray) -> None:
        self.config = config
        self.rows = rows
        self.windows: list[dict[str, Any]] = []

    async def warm(self, target: loadgen.Target, scenario: Scenario, seconds: float) -> None:
        senders = await target.open(np.ascontiguousarray(self.rows[:scenario.rows]), scenario.concurrency)
        try:
            await loadgen.closed_loop(senders, seconds, scenario.rows)
        finally:
            await target.close()

    async def measure(self, name: str, target: loadgen.Target, scenario: Scenario,
                      processes: Callable[[], dict[str, list[psutil.Process]]],
                      backend_calls: Callable[[], tuple[float, float]] | None = None) -> dict[str, Any]:
        c = self.config
        x = np.ascontiguousarray(self.rows[:scenario.rows])  # (rows, 1, 8, 8)
        senders = await target.open(x, scenario.concurrency)
        try:
            await loadgen.closed_loop(senders, c.warmup_s, scenario.rows)
            best: dict[str, Any] | None = None
            for attempt in range(1, c.max_attempts + 1):
                calls_before = backend_calls() if backend_calls else (0.0, 0.0)
                with CpuMeter(processes()) as meter:
                    window = await loadgen.closed_loop(senders, c.seconds, scenario.rows)
                result = {"target": name, "scenario": scenario.name, "concurrency": scenario.concurrency,
                          "rows": scenario.rows, **window.summary(), "cpu_s": meter.cpu_s,
                          "other_cores": round(meter.other_cores, 2), "attempts": attempt}
                if backend_calls:  # how well the front door coalesced: its calls to TorchServe in the window
                    calls, rows = (after - before for after, before in zip(backend_calls(), calls_before, strict=True))
                    result["backend_calls"] = calls
                    result["rows_per_backend_call"] = round(rows / calls, 2) if calls else None
                if best is None or result["other_cores"] < best["other_cores"]:
                    best = result
                if meter.other_cores <= c.max_other_cores:
                    break
        finally:
            await target.close()
        assert best is not None
        self.windows.append(best)
        print(f"  {name:<24} {scenario.name:<11} {best['req_s']:>8.0f} req/s {best['rows_s']:>9.0f} rows/s "
              f"p50 {best['p50_ms']:6.2f} ms p99 {best['p99_ms']:6.2f} ms errors {best['errors']} "
              f"other {best['other_cores']:.2f} cores", flush=True)
        return best


def in_process(archive: Path, seconds: float, batch: np.ndarray) -> dict[str, Any]:
    """The handler against the raw forward (bench/handler_throughput.py, CPU time: cost without interference),
    then the raw ceiling in wall-clock rows/s under the same load as the windows (best over threads and rows
    per call), and the raw forward over the batch job's rows in the job's chunks of 256."""
    import torch

    from handlers.handler import DigitsHandler

    with tempfile.TemporaryDirectory(prefix="gradserve-bench-") as tmp:
        handler = DigitsHandler()
        model_dir = handler_throughput.model_dir(archive, Path(tmp))
        handler.initialize(SimpleNamespace(system_properties={"model_dir": str(model_dir), "gpu_id": None},
                                           model_yaml_config={"maxWorkers": 1}))
    threads = torch.get_num_threads()
    model = handler.model  # bench/handler_throughput.py swaps stand-ins into the handler
    try:
        table: list[dict[str, Any]] | dict[str, str] = handler_throughput.measure(handler, seconds)
    except Exception as e:  # noqa: BLE001 - another helper's benchmark: report its failure, measure the rest
        print(f"  bench/handler_throughput.py failed: {type(e).__name__}: {e}", flush=True)
        table = {"error": f"{type(e).__name__}: {e}"}
    ceiling: dict[str, Any] = {"rows_s": 0.0}
    batch_raw: dict[str, Any] = {"rows_s": 0.0}
    tensors = {n: torch.from_numpy(np.ascontiguousarray(batch[:n])) for n in (64, 256)}
    chunks = [torch.from_numpy(np.ascontiguousarray(part)) for part in np.array_split(batch, -(-len(batch) // 256))]

    def forward_all() -> None:
        for chunk in chunks:
            model(chunk)

    with torch.inference_mode():
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            for n, x in tensors.items():
                rate = wall_rows_per_second(lambda x=x: model(x), n, seconds)
                if rate > ceiling["rows_s"]:
                    ceiling = {"rows_s": rate, "threads": t, "rows_per_call": n}
            rate = wall_rows_per_second(forward_all, len(batch), max(seconds, 1.0), blocks=3)
            if rate > batch_raw["rows_s"]:
                batch_raw = {"rows_s": rate, "threads": t, "rows": len(batch), "rows_per_call": 256}
    torch.set_num_threads(threads)
    return {"handler_threads": threads, "table": table, "ceiling": ceiling, "batch_raw": batch_raw}


def wall_rows_per_second(fn: Callable[[], Any], rows: int, seconds: float, blocks: int = 5) -> float:
    """The median over short blocks of rows per wall-clock second (each block runs `fn` at least once)."""
    fn()
    rates = []
    for _ in range(blocks):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / blocks or not calls:
            fn()
            calls += 1
        rates.append(calls * rows / elapsed)
    return float(np.median(rates))


def batch_job(door: FrontDoor, rows: np.ndarray, workdir: Path) -> dict[str, Any]:
    """`gradserve batch` over `rows` through the front door, as a user runs it (its own process)."""
    source, output = workdir / "batch-input.npy", workdir / "batch-output.npy"
    np.save(source, rows)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with CpuMeter(roles(psutil.Process(door.process.pid), "frontdoor")) as meter:
        done = subprocess.run([str(GRADSERVE), "batch", "--input", str(source), "--output", str(output),
                               "--grpc", door.grpc_target, "--token", door.token, "--no-progress"],
                              capture_output=True, text=True, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"gradserve batch failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = {**meter.cpu_s, "batch_client": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)}
    cpu.pop("loadgen")
    return {"rows": summary["rows"], "failed": summary["failed"], "seconds": summary["seconds"],
            "rows_s": summary["rows_per_s"], "cpu_s": cpu, "other_cores": round(meter.other_cores, 2),
            "rows_per_request": 256, "concurrency": 4}


def profile_front_door(door: FrontDoor, seconds: float, out: Path) -> dict[str, Any]:
    """Start py-spy on the front door for `seconds`; returns the pending process (summarised afterwards)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    process = subprocess.Popen([spy, "record", "--pid", str(door.process.pid), "--duration", str(int(seconds)),
                                "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"process": process, "file": out}


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(n / total, 3)) for f, n in counter.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive), "file": str(path)}


@dataclass(frozen=True)
class Way:
    """One target of the run: how to build its client, which scenarios it runs, what it costs."""

    name: str
    make: Callable[[], loadgen.Target]
    scenarios: tuple[Scenario, ...]
    processes: Callable[[], dict[str, list[psutil.Process]]]
    backend_calls: Callable[[], tuple[float, float]] | None = None


async def run_all(config: BenchConfig, stores: dict[str, Path], work: Path, rows: np.ndarray,
                  batch_rows: np.ndarray) -> dict[str, Any]:
    """All three stacks run at once (an idle one costs next to nothing) so that the windows can go scenario by
    scenario, every target in turn: the load of other processes drifts, and neighbouring windows share it."""
    print("starting TorchServe (batchSize 32, 5 ms), TorchServe (batchSize 1) and the front door (its own "
          f"TorchServe on the archive gradserve.yaml configures: {config.frontdoor_archive})", flush=True)
    with contextlib.ExitStack() as stack:
        ts = stack.enter_context(running_torchserve(stores["batched"], work / "ts-batched"))
        ts1 = stack.enter_context(running_torchserve(stores["unbatched"], work / "ts-unbatched"))
        door = stack.enter_context(running_front_door(stores["frontdoor"], work / "frontdoor", config.serve_config))
        key, key1 = ts.read_keys().inference, ts1.read_keys().inference
        in_ts = lambda: roles(psutil.Process(ts.pid), "ts_launcher")  # noqa: E731
        in_ts1 = lambda: roles(psutil.Process(ts1.pid), "ts_launcher")  # noqa: E731
        in_door = lambda: roles(psutil.Process(door.process.pid), "frontdoor")  # noqa: E731
        calls = lambda: backend_calls(door)  # noqa: E731
        ways = [
            Way("torchserve_grpc", lambda: loadgen.TorchServeGrpc(ts.grpc_inference_target, key), SCENARIOS, in_ts),
            Way("torchserve_rest", lambda: loadgen.TorchServeRest(ts.inference_url, key), SCENARIOS, in_ts),
            Way("torchserve_grpc_nobatch", lambda: loadgen.TorchServeGrpc(ts1.grpc_inference_target, key1),
                (BY_NAME["c1"], BY_NAME["c64"]), in_ts1),
            Way("frontdoor_grpc", lambda: loadgen.FrontDoorGrpc(door.grpc_target, door.token), SCENARIOS, in_door,
                calls),
            Way("frontdoor_stream", lambda: loadgen.FrontDoorStream(door.grpc_target, door.token), SCENARIOS,
                in_door, calls),
            Way("frontdoor_rest", lambda: loadgen.FrontDoorRest(door.http_url, door.token), SCENARIOS, in_door, calls),
        ]
        bench = Bench(config, rows)
        print(f"warm-up: c=64 single-row for {config.jvm_warmup_s:.0f} s per way (a JVM only reaches its speed "
              "once it has compiled its hot paths; a fresh TorchServe is ~1.5x slower)", flush=True)
        for way in ways:
            await bench.warm(way.make(), BY_NAME["c64"], config.jvm_warmup_s)
        for scenario in SCENARIOS:
            for way in ways:
                if scenario in way.scenarios:
                    await bench.measure(way.name, way.make(), scenario, way.processes, way.backend_calls)
        print(f"batch job: gradserve batch over {len(batch_rows)} rows", flush=True)
        batch = batch_job(door, batch_rows, work)
        print(f"  {batch['rows_s']:.0f} rows/s, {batch['failed']} failed", flush=True)
        profile = await profile_under_load(config, door, ways[3], rows) if config.profile else {}
    return {"windows": bench.windows, "batch": batch, "profile": profile}


async def profile_under_load(config: BenchConfig, door: FrontDoor, way: Way, rows: np.ndarray) -> dict[str, Any]:
    """py-spy on the front door while `way` runs c=64 single-row requests."""
    seconds = max(10.0, config.seconds * 2)
    profile = profile_front_door(door, seconds, config.out_dir / f"{config.label}-frontdoor.pyspy.txt")
    if "process" not in profile:
        return profile
    profiled = BenchConfig(**{**asdict(config), "seconds": seconds, "max_attempts": 1})
    await Bench(profiled, rows).measure(f"{way.name} (profiled)", way.make(), BY_NAME["c64"], way.processes)
    profile["process"].wait(60)
    if not Path(profile["file"]).exists():
        return {"error": "py-spy wrote nothing (permission to trace?)"}
    return summarize_profile(profile["file"])


# --- the report ---------------------------------------------------------------------------------------------------

SERVER_ROLES = ("frontdoor", "ts_launcher", "ts_java", "ts_worker")


def server_cpu_ms_per_request(window: dict[str, Any]) -> float:
    cpu = sum(window["cpu_s"].get(r, 0.0) for r in SERVER_ROLES)
    return 1000 * cpu / max(1, window["requests"])


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    w = {(x["target"], x["scenario"]): x for x in results["windows"]}
    ceiling = results["in_process"]["ceiling"]["rows_s"]
    fd64, ts64 = w[("frontdoor_grpc", "c64")], w[("torchserve_grpc", "c64")]
    fd1, ts1 = w[("frontdoor_grpc", "c1")], w[("torchserve_grpc_nobatch", "c1")]
    rest, grpc_ = w[("frontdoor_rest", "c16")], w[("frontdoor_grpc", "c16")]
    big = w[("frontdoor_grpc", "rows256_c8")]
    batch, raw = results["batch"], results["in_process"]["batch_raw"]
    rows = [
        ("front door gRPC / TorchServe direct gRPC (best setting), req/s, c=64 single-row",
         fd64["req_s"] / ts64["req_s"], ">= 1.5", fd64["req_s"] / ts64["req_s"] >= 1.5),
        ("p50 at c=1: front door gRPC - TorchServe direct gRPC batching off, ms",
         fd1["p50_ms"] - ts1["p50_ms"], "<= +0.5 ms", fd1["p50_ms"] - ts1["p50_ms"] <= 0.5),
        ("256-row requests c=8, front door gRPC rows/s / raw in-process ceiling",
         big["rows_s"] / ceiling, ">= 0.5", big["rows_s"] / ceiling >= 0.5),
        ("256-row requests c=8, TorchServe direct gRPC rows/s / raw ceiling (reference)",
         w[("torchserve_grpc", "rows256_c8")]["rows_s"] / ceiling, "", None),
        ("REST / gRPC server CPU per request, front door, c=16 single-row",
         server_cpu_ms_per_request(rest) / server_cpu_ms_per_request(grpc_), "<= 1.5",
         server_cpu_ms_per_request(rest) / server_cpu_ms_per_request(grpc_) <= 1.5),
        ("REST / gRPC req/s, front door, c=16 single-row (reference)", rest["req_s"] / grpc_["req_s"], "", None),
        ("batch job rows/s / raw forward on the same rows", batch["rows_s"] / raw["rows_s"], ">= 0.5",
         batch["rows_s"] / raw["rows_s"] >= 0.5),
    ]
    return [{"figure": f, "value": round(v, 3), "target": t, "met": m} for f, v, t, m in rows]


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"## `gradserve bench` {results['date']}", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             f"Window {s['seconds']} s after {s['warmup_s']} s warm-up (and "
             f"{s.get('jvm_warmup_s', '0')} s at c=64 per way before the first window); "
             "front door's TorchServe archive: "
             f"{s['frontdoor_archive']}; archives' maxWorkers {s.get('max_workers', 1)} (one worker runs). "
             "CPU columns: ms of CPU per request of each process "
             "(loadgen = the client; server = front door + TorchServe java + its python worker); rows/backend call: "
             "rows per front-door call to TorchServe after coalescing; `other`: cores "
             "that processes not under test used during the window.", "",
             "| target | scenario | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | loadgen CPU | front door CPU "
             "| TS java CPU | TS worker CPU | server CPU | rows/backend call | other | tries |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in results["windows"]:
        per = {r: 1000 * v / max(1, w["requests"]) for r, v in w["cpu_s"].items()}
        lines.append(
            f"| {w['target']} | {w['scenario']} | {w['req_s']:.0f} | {w['rows_s']:.0f} | {w['p50_ms']:.2f} | "
            f"{w['p90_ms']:.2f} | {w['p99_ms']:.2f} | {w['errors']} | {per.get('loadgen', 0):.3f} | "
            f"{per.get('frontdoor', 0):.3f} | {per.get('ts_java', 0):.3f} | {per.get('ts_worker', 0):.3f} | "
            f"{server_cpu_ms_per_request(w):.3f} | {w.get('rows_per_backend_call') or ''} | {w['other_cores']:.2f} | "
            f"{w['attempts']} |")
    ip, b = results["in_process"], results["batch"]
    handler_table = ip["table"] if isinstance(ip["table"], dict) else ", ".join(
        f"{r['rows']} rows: raw {r['raw_rows_per_s']:.0f}, handler {r['handler_rows_per_s']:.0f}" for r in ip["table"])
    lines += ["", f"In-process (bench/handler_throughput.py, rows/s): {handler_table}  ",
        f"Raw ceiling: {ip['ceiling']['rows_s']:.0f} rows/s ({ip['ceiling']['threads']} thread(s), "
        f"{ip['ceiling']['rows_per_call']} rows per call).  ",
        f"Batch job: {b['rows']} rows at {b['rows_s']:.0f} rows/s ({b['failed']} failed; 256 rows per request, "
        f"4 in flight) vs raw forward on the same rows {ip['batch_raw']['rows_s']:.0f} rows/s; CPU s: {b['cpu_s']}.",
        "", "| figure | value | target | met |", "|---|---:|---|---|"]
    for r in results["ratios"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {r['value']:.3f} | {r['target']} | {met} |")
    if results.get("profile", {}).get("self"):
        p = results["profile"]
        lines += ["", f"Front door profile (py-spy, {p['samples']} samples, frontdoor_grpc c64), own time:", ""]
        lines += [f"- {share:.1%} {frame}" for frame, share in p["self"][:10]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(w["target"] for w in results["windows"]))
    w = {(x["target"], x["scenario"]): x for x in results["windows"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        xs = [j + i * width for j, s in enumerate(SCENARIOS) if (t, s.name) in w]
        left.bar(xs, [w[(t, s.name)]["rows_s"] for s in SCENARIOS if (t, s.name) in w], width, label=t)
    left.axhline(results["in_process"]["ceiling"]["rows_s"], color="k", ls="--", lw=1, label="raw ceiling")
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(SCENARIOS))], [s.name for s in SCENARIOS])
    left.set_yscale("log")
    left.set_ylabel("rows/s")
    left.legend(fontsize=7)
    left.set_title("throughput (single-row scenarios: rows/s = req/s)")
    c1 = [t for t in targets if (t, "c1") in w]
    right.bar(range(len(c1)), [w[(t, "c1")]["p50_ms"] for t in c1], label="p50")
    right.scatter(range(len(c1)), [w[(t, "c1")]["p99_ms"] for t in c1], color="r", zorder=3, label="p99")
    right.set_xticks(range(len(c1)), c1, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("ms")
    right.set_title("latency at concurrency 1")
    right.legend(fontsize=7)
    fig.suptitle(f"gradserve bench {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table: str, readme: Path = BENCH / "README.md") -> None:
    begin, end = "<!-- latest results: written by gradserve bench -->", "<!-- end of latest results -->"
    text = readme.read_text() if readme.exists() else "# bench\n"
    block = f"{begin}\n{table}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    readme.write_text(text)


# --- the command --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present); "
                        "its serve: section configures the front door")
    parser.add_argument("--run", type=Path, default=None, help="the run to package (default runs_dir/<train.name>)")
    parser.add_argument("--quick", action="store_true", help="short windows: about a minute in all")
    parser.add_argument("--seconds", type=float, default=None, help="measuring window (default 5; --quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up per window (default 1; --quick 0.3)")
    parser.add_argument("--jvm-warmup", type=float, default=None,
                        help="c=64 load per way before the first window, for the JVMs' compilers (default 10; "
                             "--quick 2)")
    parser.add_argument("--batch-rows", type=int, default=20480, help="rows of the batch job")
    parser.add_argument("--max-other-cores", type=float, default=0.3,
                        help="repeat a window when other processes used more cores than this")
    parser.add_argument("--max-attempts", type=int, default=None, help="tries per window at most (default 2; "
                        "--quick 1)")
    parser.add_argument("--max-workers", type=int, default=1,
                        help="maxWorkers in the archives (one worker starts either way; the handler gives each "
                        "worker cores // maxWorkers torch threads)")
    parser.add_argument("--profile", action="store_true", help="py-spy the front door under c=64 single-row")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where <date>.json/.md/.png go")


def main(args: argparse.Namespace) -> int:
    from training.package import PackageConfig, package

    config_path = args.config or ("gradserve.yaml" if Path("gradserve.yaml").exists() else None)
    file = load_file(config_path)
    train = file.get("train") or {}
    run = args.run or Path(train.get("runs_dir", "runs")) / train.get("name", "digits")
    if not (run / "selection.json").exists():
        print(f"gradserve bench: {run} is not a trained run; train one first (gradserve train) or pass --run")
        return 2
    date = datetime.now().strftime("%Y-%m-%dT%H%M%S")
    config = BenchConfig(
        run=run, out_dir=args.out_dir, seconds=args.seconds or (1.0 if args.quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0),
        jvm_warmup_s=args.jvm_warmup if args.jvm_warmup is not None else (2.0 if args.quick else 10.0),
        in_process_s=0.25 if args.quick else 1.0, batch_rows=args.batch_rows, max_other_cores=args.max_other_cores,
        max_attempts=args.max_attempts or (1 if args.quick else 2),
        serve_config=str(Path(config_path).resolve()) if config_path else os.devnull, profile=args.profile,
        label=date + ("-quick" if args.quick else ""))
    config.out_dir.mkdir(parents=True, exist_ok=True)
    shipped = build(PackageConfig, file.get("package"), {"max_workers": args.max_workers})
    config = replace(config, frontdoor_archive=f"batchSize {shipped.batch_size}, "
                                               f"maxBatchDelay {shipped.max_batch_delay_ms} ms")
    from sklearn.datasets import load_digits

    images = (load_digits().images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    batch_rows = np.resize(images, (config.batch_rows, *images.shape[1:]))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gradserve-bench-") as tmp:
        work = Path(tmp)
        stores = {}
        archives = {"batched": replace(shipped, batch_size=32, max_batch_delay_ms=5),  # TorchServe's best
                    "unbatched": replace(shipped, batch_size=1, max_batch_delay_ms=0), "frontdoor": shipped}
        for name, settings in archives.items():
            package(run, replace(settings, model_store=str(work / name)), allow_fallback=True, force=True)
            stores[name] = work / name
        print("in-process: raw forward and handler", flush=True)
        results: dict[str, Any] = {"in_process": in_process(stores["batched"] / "digits.mar", config.in_process_s,
                                                             batch_rows)}
        results.update(asyncio.run(run_all(config, stores, work, images, batch_rows)))
    results = {"date": date, "command": "gradserve bench " + " ".join(sys.argv[2:]),
               "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, Python {platform.python_version()}",
               "settings": {**{k: str(v) for k, v in asdict(config).items()},
                            "max_workers": args.max_workers},
               "wall_s": round(time.monotonic() - started, 1), **results}
    results["ratios"] = ratios(results)
    stem = config.out_dir / config.label
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    plot(results, stem.with_suffix(".png"))
    if config.out_dir.resolve() == RESULTS.resolve():
        update_readme(table)
    print(table)
    print(f"wrote {stem}.json, .md, .png in {results['wall_s']:.0f} s")
    errors = sum(w["errors"] for w in results["windows"]) + results["batch"]["failed"]
    return 1 if errors else 0
