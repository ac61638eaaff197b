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
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import loadgen
from bench.measure import (
    BY_NAME,
    QUICK,
    RESULTS,
    SCENARIOS,
    Bench,
    BenchConfig,
    Scenario,
    backend_calls,
    batch_job,
    in_process,
    profile_front_door,
    roles,
    summarize_profile,
)
from bench.report import markdown, plot, ratios, update_readme
from bench.stacks import FrontDoor, running_front_door, running_torchserve
from gradserve import config as gradserve_config
from gradserve.errors import UsageError


@dataclass(frozen=True)
class Way:
    """One target of the run: how to build its client, which scenarios it runs, what it costs."""

    name: str
    make: Callable[[], loadgen.Target]
    scenarios: tuple[Scenario, ...]
    processes: Callable[[], dict[str, list[psutil.Process]]]
    backend_calls: Callable[[], tuple[float, float]] | None = None


async def run_all(config: BenchConfig, stores: dict[str, Path], work: Path, rows: np.ndarray,
                  batch_rows: np.ndarray, serve_config: str, label: str) -> dict[str, Any]:
    """All three stacks run at once (an idle one costs next to nothing) so that the windows can go scenario by
    scenario, every target in turn: the load of other processes drifts, and neighbouring windows share it.
    `serve_config` is the gradserve.yaml whose serve: section configures the front door."""
    print("starting TorchServe (batchSize 32, 5 ms), TorchServe (batchSize 1) and the front door (its own "
          "TorchServe on the archive gradserve.yaml configures)", flush=True)
    token = os.urandom(12).hex()
    with contextlib.ExitStack() as stack:
        ts, keys = stack.enter_context(running_torchserve(stores["batched"], work / "ts-batched"))
        ts1, keys1 = stack.enter_context(running_torchserve(stores["unbatched"], work / "ts-unbatched"))
        door = stack.enter_context(running_front_door(stores["frontdoor"], work / "frontdoor", token,
                                                      config=serve_config, ready_timeout=240))
        key, key1 = keys.inference, keys1.inference
        in_ts = lambda: roles(psutil.Process(ts.pid), "ts_launcher")  # noqa: E731
        in_ts1 = lambda: roles(psutil.Process(ts1.pid), "ts_launcher")  # noqa: E731
        in_door = lambda: roles(psutil.Process(door.process.pid), "frontdoor")  # noqa: E731
        calls = lambda: backend_calls(door)  # noqa: E731
        ways = [
            Way("torchserve_grpc", lambda: loadgen.TorchServeGrpc(ts.endpoint.grpc_target, key), SCENARIOS, in_ts),
            Way("torchserve_rest", lambda: loadgen.TorchServeRest(ts.endpoint.inference_url, key), SCENARIOS, in_ts),
            Way("torchserve_grpc_nobatch", lambda: loadgen.TorchServeGrpc(ts1.endpoint.grpc_target, key1),
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
        profile = await profile_under_load(config, door, ways[3], rows, label) if config.profile else {}
    return {"windows": bench.windows, "batch": batch, "profile": profile}


async def profile_under_load(config: BenchConfig, door: FrontDoor, way: Way, rows: np.ndarray, label: str
                             ) -> dict[str, Any]:
    """py-spy on the front door while `way` runs c=64 single-row requests."""
    seconds = max(10.0, config.seconds * 2)
    profile = profile_front_door(door, seconds, Path(config.out_dir) / f"{label}-frontdoor.pyspy.txt")
    if "process" not in profile:
        return profile
    profiled = BenchConfig(**{**asdict(config), "seconds": seconds, "max_attempts": 1})
    await Bench(profiled, rows).measure(f"{way.name} (profiled)", way.make(), BY_NAME["c64"], way.processes)
    profile["process"].wait(60)
    if not Path(profile["file"]).exists():
        return {"error": "py-spy wrote nothing (permission to trace?)"}
    return summarize_profile(profile["file"])


# --- the command --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present); "
                        "its bench: section sets the defaults below, its serve: section configures the front door")
    parser.add_argument("--run", default=None, help="the run to package (default runs_dir/<train.name>)")
    parser.add_argument("--quick", action="store_true", help="short windows: about a minute in all")
    parser.add_argument("--seconds", type=float, default=None, help="measuring window (default 5; --quick 1)")
    parser.add_argument("--warmup", dest="warmup_s", type=float, default=None,
                        help="warm-up per window (default 1; --quick 0.3)")
    parser.add_argument("--jvm-warmup", dest="jvm_warmup_s", type=float, default=None,
                        help="c=64 load per way before the first window, for the JVMs' compilers (default 10; "
                             "--quick 2)")
    parser.add_argument("--batch-rows", dest="batch_rows", type=int, default=None,
                        help="rows of the batch job (default 20480)")
    parser.add_argument("--max-other-cores", dest="max_other_cores", type=float, default=None,
                        help="repeat a window when other processes used more cores than this (default 0.3)")
    parser.add_argument("--max-attempts", dest="max_attempts", type=int, default=None,
                        help="tries per window at most (default 2; --quick 1)")
    parser.add_argument("--max-workers", dest="max_workers", type=int, default=None,
                        help="maxWorkers in the archives (default 1; one worker starts either way)")
    parser.add_argument("--profile", action="store_true", default=None, help="py-spy the front door under c=64")
    parser.add_argument("--out-dir", dest="out_dir", default=None, help="where <date>.json/.md/.png go")


FLAGS = ("run", "seconds", "warmup_s", "jvm_warmup_s", "batch_rows", "max_other_cores", "max_attempts", "max_workers",
         "profile", "out_dir")


def main(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.package import PackageConfig, package

    path = gradserve_config.default_path(args.config)
    flags = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    config = gradserve_config.load(BenchConfig, path, "bench", {**(QUICK if args.quick else {}), **flags})
    if config.run is None:
        train = gradserve_config.load(TrainConfig, path, "train")
        config = replace(config, run=str(Path(train.runs_dir) / train.name))
    run = Path(str(config.run))
    if not (run / "selection.json").exists():
        raise UsageError(f"{run} is not a trained run; train one first (gradserve train) or pass --run")
    label = datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if args.quick else "")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped = gradserve_config.load(PackageConfig, path, "package", {"max_workers": config.max_workers})
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
        serve_config = str(path.resolve()) if path else os.devnull
        results.update(asyncio.run(run_all(config, stores, work, images, batch_rows, serve_config, label)))
    results = {"date": label, "command": "gradserve bench " + " ".join(sys.argv[2:]),
               "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, Python {platform.python_version()}",
               "settings": {**{k: str(v) for k, v in asdict(config).items()},
                            "frontdoor_archive": f"batchSize {shipped.batch_size}, "
                                                 f"maxBatchDelay {shipped.max_batch_delay_ms} ms"},
               "wall_s": round(time.monotonic() - started, 1), **results}
    return write_results(results, out_dir / label)


def write_results(results: dict[str, Any], stem: Path) -> int:
    """<stem>.json, .md and .png, the table in bench/README.md when written to bench/results; 1 on any error."""
    results["ratios"] = ratios(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    plot(results, stem.with_suffix(".png"))
    if stem.parent.resolve() == RESULTS.resolve():
        update_readme(table)
    print(table)
    print(f"wrote {stem}.json, .md, .png in {results['wall_s']:.0f} s")
    errors = sum(w["errors"] for w in results["windows"]) + results["batch"]["failed"]
    return 1 if errors else 0
