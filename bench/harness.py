"""`gradserve bench`: every way into each model, measured side by side in one run.

    gradserve bench [--models digits,digits-rgb,resnet,cancer] [--peers mlserver,kserve,triton] [--quick]
                    [--run runs/digits] [--runs-dir DIR] [--train-epochs N] [--seconds 5] [--profile]

Per model (bench/models.py: the config's own, or an example's `train.name`; a missing run is trained with its
config), bench/model_run.py packages the run three ways, measures the raw forward and the handler in-process
(bench/handler_throughput.py; the raw ceiling is the best wall-clock rows/s of the plain forward), then starts
TorchServe with its best direct setting (batchSize 32, maxBatchDelay 5 ms, one worker), TorchServe with batching
off (batchSize 1, for the latency at concurrency 1), both hit directly over gRPC Predictions and REST, the front
door (`gradserve serve`, which starts its own TorchServe) over gRPC ModelInfer, ModelStreamInfer and REST JSON,
and each peer server asked for (bench/peer_stacks.py: MLServer, KServe, PyTriton, each in its own venv, over
OIP gRPC and REST). The windows go scenario by scenario (SCENARIOS), every target in turn, so that neighbouring
windows share the machine's drifting load; each runs the closed-loop load generator of bench/loadgen.py (in this
process) after a warm-up, and is repeated when other processes used more than --max-other-cores (at most
--max-attempts times, the quietest kept). Last, a `gradserve batch` job against a raw forward over the same rows.
Writes <out>/<date>.json, .md (tables, the issue's ratios, gradserve / best peer) and .png, and the latest table
into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench import peer_stacks
from bench.measure import QUICK, RESULTS, SCENARIOS, BenchConfig
from bench.model_run import bench_model
from bench.models import BenchModel, ensure_trained, resolve
from bench.report import markdown, peer_ratios, plot, ratios, update_readme
from gradserve import config as gradserve_config

__all__ = ["SCENARIOS", "add_arguments", "main"]


# --- the command --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present); "
                        "its bench: section sets the defaults below, its serve: section configures the front door")
    parser.add_argument("--models", type=names, default=None,
                        help="comma-separated models to measure (default digits,digits-rgb,resnet,cancer: the "
                             "config's own and examples' train.name)")
    parser.add_argument("--peers", type=names, default=None,
                        help="comma-separated peer servers to measure beside gradserve: mlserver,kserve,triton "
                             "(each needs its venv: make bench-peers)")
    parser.add_argument("--run", default=None, help="the config's own model's run (default runs_dir/<train.name>)")
    parser.add_argument("--runs-dir", dest="runs_dir", default=None,
                        help="the examples' runs, found or trained here (default: beside each example)")
    parser.add_argument("--train-epochs", dest="train_epochs", type=int, default=None,
                        help="a model without a run is trained first; cap its config's epochs at this many")
    parser.add_argument("--quick", action="store_true", help="short windows: a minute or two per model")
    parser.add_argument("--seconds", type=float, default=None, help="measuring window (default 5; --quick 1)")
    parser.add_argument("--warmup", dest="warmup_s", type=float, default=None,
                        help="warm-up per window (default 1; --quick 0.3)")
    parser.add_argument("--jvm-warmup", dest="jvm_warmup_s", type=float, default=None,
                        help="c=64 load per way before the first window, for the JVMs' compilers (default 10; "
                             "--quick 2)")
    parser.add_argument("--in-process", dest="in_process_s", type=float, default=None,
                        help="seconds per row count and path of the in-process figures (default 1; --quick 0.25)")
    parser.add_argument("--batch-rows", dest="batch_rows", type=int, default=None,
                        help="rows of the batch job (default 20480, at most 64 MiB of them)")
    parser.add_argument("--max-other-cores", dest="max_other_cores", type=float, default=None,
                        help="repeat a window when other processes used more cores than this (default 0.3)")
    parser.add_argument("--max-attempts", dest="max_attempts", type=int, default=None,
                        help="tries per window at most (default 2; --quick 1)")
    parser.add_argument("--workers", dest="workers", type=int, default=None,
                        help="TorchServe workers per model, for the front door and TorchServe direct alike (the "
                             "archives' min/max_workers; default: each model's own package config): each gets "
                             "cores // workers torch threads")
    parser.add_argument("--profile", action="store_true", default=None, help="py-spy the front door under c=64")
    parser.add_argument("--out-dir", dest="out_dir", default=None, help="where <date>.json/.md/.png go")


def package_settings(model: BenchModel, shipped: Any, workers: int) -> Any:
    """The bench's package settings, with the workers (unless `workers` sets them for all), torch threads and
    compiled forward (`optimize`) the model's own config gives it."""
    from training.package import PackageConfig

    if model.config is None:
        return shipped
    own = gradserve_config.load(PackageConfig, model.config, "package")
    mine = replace(shipped, torch_threads=own.torch_threads, parallel_rows=own.parallel_rows, optimize=own.optimize)
    return mine if workers else replace(mine, min_workers=own.min_workers, max_workers=own.max_workers)


def names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


FLAGS = ("models", "peers", "run", "runs_dir", "train_epochs", "seconds", "warmup_s", "jvm_warmup_s", "in_process_s",
         "batch_rows", "max_other_cores", "max_attempts", "workers", "profile", "out_dir")


def main(args: argparse.Namespace) -> int:
    from training.package import PackageConfig

    path = gradserve_config.default_path(args.config)
    flags = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    if "run" in flags and "models" not in flags:  # --run alone: that run's model only, as before
        flags["models"] = (Path(flags["run"]).resolve().name,)
    config = gradserve_config.load(BenchConfig, path, "bench", {**(QUICK if args.quick else {}), **flags})
    models = resolve(list(config.models), path, Path(config.run) if config.run else None,
                     Path(config.runs_dir) if config.runs_dir else None)
    for model in models:
        ensure_trained(model, config.train_epochs)
    peers, missing = peer_stacks.select(list(config.peers))
    for line in missing:
        print(line, flush=True)
    label = datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if args.quick else "")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    forced = {"min_workers": config.workers, "max_workers": config.workers} if config.workers else {}
    shipped = gradserve_config.load(PackageConfig, path, "package", forced)
    serve_config = str(path.resolve()) if path else os.devnull
    started = time.monotonic()
    per_model: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gradserve-bench-") as tmp:
        for model in models:
            mine = package_settings(model, shipped, config.workers)
            per_model[model.name] = bench_model(config, model, mine, Path(tmp) / model.name, serve_config, label, peers)
    results = {"date": label, "command": "gradserve bench " + " ".join(sys.argv[2:]),
               "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, Python {platform.python_version()}",
               "settings": {**{k: str(v) for k, v in asdict(config).items()},
                            "frontdoor_archive": f"batchSize {shipped.batch_size}, "
                                                 f"maxBatchDelay {shipped.max_batch_delay_ms} ms"},
               "wall_s": round(time.monotonic() - started, 1), "models": [m.name for m in models],
               "missing_peers": missing, **combine(per_model)}
    return write_results(results, out_dir / label)


def combine(per_model: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every model's windows in one list (each names its model); the rest by model."""
    return {"windows": [w for r in per_model.values() for w in r["windows"]],
            **{key: {name: r[key] for name, r in per_model.items()}
               for key in ("in_process", "batch", "profile", "peers")}}


def write_results(results: dict[str, Any], stem: Path) -> int:
    """<stem>.json, .md and .png, the table in bench/README.md when written to bench/results; 1 on any error."""
    results["ratios"] = ratios(results)
    results["peer_ratios"] = peer_ratios(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    plot(results, stem.with_suffix(".png"))
    if stem.parent.resolve() == RESULTS.resolve():
        update_readme(table)
    print(table)
    print(f"wrote {stem}.json, .md, .png in {results['wall_s']:.0f} s")
    errors = sum(w["errors"] for w in results["windows"]) + sum(b["failed"] for b in results["batch"].values())
    return 1 if errors else 0
