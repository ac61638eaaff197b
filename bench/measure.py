"""What `gradserve bench` measures and how: the scenarios, a closed-loop window per target with the CPU of
every process under test (repeated when other processes were busy), the in-process raw forward and handler,
the batch job, and py-spy profiles."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench import handler_throughput, loadgen
from bench.stacks import GRADSERVE, FrontDoor
from gradserve.config import path_field

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    rows: int  # rows per request


SCENARIOS = (Scenario("c1", 1, 1), Scenario("c16", 16, 1), Scenario("c64", 64, 1), Scenario("rows64_c8", 8, 64),
             Scenario("rows256_c8", 8, 256))
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class BenchConfig:
    """`bench:` in gradserve.yaml; flags override it (`--quick` sets the QUICK values first)."""

    models: tuple[str, ...] = ("digits", "digits-rgb", "resnet", "cancer")  # bench/models.py: what each name is
    run: str | None = path_field()  # the config's own model's run; None: runs_dir/<train.name>
    runs_dir: str | None = path_field()  # the examples' runs (found or trained) here; None: beside each example
    train_epochs: int | None = None  # a model without a run is trained with its config, capped at this many epochs
    peers: tuple[str, ...] = ()  # bench/peer_stacks.py: mlserver, kserve, triton (each from `make bench-peers`)
    out_dir: str = path_field(str(RESULTS))  # where <date>.json/.md/.png go
    seconds: float = 5.0  # measuring window per target and scenario
    warmup_s: float = 1.0
    jvm_warmup_s: float = 10.0  # c=64 per way before the first window: TorchServe's JVMs compile their hot paths
    in_process_s: float = 1.0  # per row count and path in bench/handler_throughput.py
    batch_rows: int = 20480  # rows of the batch job, at most BATCH_BYTES of them
    max_other_cores: float = 0.3  # CPU used by processes not under test, in cores, before a window is repeated
    max_attempts: int = 2
    workers: int = 0  # TorchServe workers per model (each gets cores // workers threads); 0: each model's own config
    profile: bool = False  # py-spy the front door under frontdoor_grpc c64


BATCH_BYTES = 64 * 1024 * 1024  # the batch job's input at most (a 3x64x64 model gets 1365 rows, not 20480)
QUICK = {"seconds": 1.0, "warmup_s": 0.3, "jvm_warmup_s": 2.0, "in_process_s": 0.25, "max_attempts": 1}


# --- processes under test and their CPU ------------------------------------------------------------------------

def torchserve_role(process: psutil.Process) -> str:
    """What a descendant of a TorchServe-running root is: its java, its python worker, its launcher, or a further
    front-door process (listen.processes; server/doors.py)."""
    name, cmdline = process.name(), " ".join(process.cmdline())
    if "server.doors" in cmdline:
        return "frontdoor"
    return "ts_java" if "java" in name else "ts_worker" if "model_service_worker" in cmdline else "ts_launcher"


def roles(root: psutil.Process | None, root_role: str,
          classify: Callable[[psutil.Process], str] = torchserve_role) -> dict[str, list[psutil.Process]]:
    """The load generator (this process), the root under test and its descendants, by what they are."""
    found: dict[str, list[psutil.Process]] = {"loadgen": [psutil.Process()]}
    if root is None:
        return found
    found[root_role] = [root]
    for child in root.children(recursive=True):
        try:
            role = classify(child)
        except psutil.Error:
            continue
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


def backend_calls(door: FrontDoor, model: str) -> tuple[float, float]:
    """The front door's calls to TorchServe so far and the rows they carried (its Prometheus histogram)."""
    text = httpx.get(f"{door.http_url}/metrics", headers={"authorization": f"Bearer {door.token}"}, timeout=5).text
    pattern = rf'^gradserve_backend_batch_rows_(count|sum)\{{model="{re.escape(model)}"\}} (\S+)$'
    found = dict(re.findall(pattern, text, re.M))
    return float(found.get("count", 0)), float(found.get("sum", 0))


# --- measuring ----------------------------------------------------------------------------------------------------

class Bench:
    """The windows of one model: `rows` are its input rows (at least 256 of them)."""

    def __init__(self, config: BenchConfig, rows: np.ndarray, model: str) -> None:
        self.config = config
        self.rows = rows
        self.model = model
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
        x = np.ascontiguousarray(self.rows[:scenario.rows])  # (rows, *row_shape)
        senders = await target.open(x, scenario.concurrency)
        try:
            await loadgen.closed_loop(senders, c.warmup_s, scenario.rows)
            best: dict[str, Any] | None = None
            for attempt in range(1, c.max_attempts + 1):
                calls_before = backend_calls() if backend_calls else (0.0, 0.0)
                with CpuMeter(processes()) as meter:
                    window = await loadgen.closed_loop(senders, c.seconds, scenario.rows)
                result = {"model": self.model, "target": name, "scenario": scenario.name,
                          "concurrency": scenario.concurrency, "rows": scenario.rows, **window.summary(),
                          "cpu_s": meter.cpu_s, "other_cores": round(meter.other_cores, 2), "attempts": attempt}
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
        print(f"  {self.model:<10} {name:<24} {scenario.name:<11} {best['req_s']:>8.0f} req/s "
              f"{best['rows_s']:>9.0f} rows/s "
              f"p50 {best['p50_ms']:6.2f} ms p99 {best['p99_ms']:6.2f} ms errors {best['errors']} "
              f"other {best['other_cores']:.2f} cores", flush=True)
        return best


# What every server is asked for: the peers answer the logits alone, so the front door (and the handler
# in-process) is asked for them alone too (it would add probabilities, label and class name). Every model of the
# bench is a classifier.
LOGITS = ("logits",)


def in_process(archive: Path, seconds: float, batch: np.ndarray) -> dict[str, Any]:
    """The handler against the raw forward it serves (bench/handler_throughput.py, CPU time: cost without
    interference), then the raw ceiling in wall-clock rows/s under the same load as the windows (best over threads
    and rows per call) and the raw forward over the batch job's rows in the job's chunks of 256. The raw forward is
    the one the handler serves: the model's, or its compiled forward where the archive asks for one
    (handlers/optimize.py; then the eager model's ceiling is measured too, as `eager_ceiling`)."""
    import torch

    from handlers.local import LocalModel

    with LocalModel(archive) as local:
        handler = local.handler
    threads = torch.get_num_threads()
    forward = handler.forward  # bench/handler_throughput.py swaps stand-ins into the handler
    try:
        table: list[dict[str, Any]] | dict[str, str] = handler_throughput.measure(handler, seconds, list(LOGITS))
    except Exception as e:  # noqa: BLE001 - another helper's benchmark: report its failure, measure the rest
        print(f"  bench/handler_throughput.py failed: {type(e).__name__}: {e}", flush=True)
        table = {"error": f"{type(e).__name__}: {e}"}
    tensors = {n: torch.from_numpy(np.ascontiguousarray(batch[:n])) for n in (64, 256)}
    chunks = [torch.from_numpy(np.ascontiguousarray(part)) for part in np.array_split(batch, -(-len(batch) // 256))]

    def forward_all() -> None:
        for chunk in chunks:
            forward(chunk)

    def best(fn: Callable[[torch.Tensor], Any], best_so_far: dict[str, Any], t: int) -> dict[str, Any]:
        for n, x in tensors.items():
            rate = wall_rows_per_second(lambda x=x: fn(x), n, seconds)
            if rate > best_so_far["rows_s"]:
                best_so_far = {"rows_s": rate, "threads": t, "rows_per_call": n}
        return best_so_far

    ceiling: dict[str, Any] = {"rows_s": 0.0}
    eager: dict[str, Any] | None = {"rows_s": 0.0} if handler.forward_kind.startswith("compiled") else None
    batch_raw: dict[str, Any] = {"rows_s": 0.0}
    with torch.inference_mode():
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            ceiling = best(forward, ceiling, t)
            if eager is not None:
                eager = best(handler.model, eager, t)
            rate = wall_rows_per_second(forward_all, len(batch), max(seconds, 1.0), blocks=3)
            if rate > batch_raw["rows_s"]:
                batch_raw = {"rows_s": rate, "threads": t, "rows": len(batch), "rows_per_call": 256}
    torch.set_num_threads(threads)
    return {"handler_threads": threads, "forward": handler.forward_kind, "table": table, "ceiling": ceiling,
            **({"eager_ceiling": eager} if eager is not None else {}), "batch_raw": batch_raw}


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


def batch_job(door: FrontDoor, model: str, rows: np.ndarray, workdir: Path) -> dict[str, Any]:
    """`gradserve batch` over `rows` through the front door, as a user runs it (its own process)."""
    source, output = workdir / "batch-input.npy", workdir / "batch-output.npy"
    np.save(source, rows)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with CpuMeter(roles(psutil.Process(door.process.pid), "frontdoor")) as meter:
        done = subprocess.run([str(GRADSERVE), "batch", "--input", str(source), "--output", str(output),
                               "--model", model, "--grpc", door.grpc_target, "--token", door.token, "--no-progress"],
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
