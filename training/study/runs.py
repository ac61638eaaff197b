"""The runs of a study: runs_dir/<name>-study/seed-<k>/, one per seed, trained with early stopping off (the study
cuts them where it would have stopped) and reused when they are finished runs of the same config; and what the
study reads back from their files (selection.json, summary.json, metrics.jsonl), with no model loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.selection import Record
from training.study.analysis import StudyRun
from training.study.strategies import Metric

CLASSIFICATION = (Metric("test_accuracy", "test accuracy", True, "points"),
                  Metric("test_loss", "test cross-entropy", False, "nats"))
REGRESSION = (Metric("test_mse", "test MSE", False, "%"), Metric("test_mae", "test MAE", False, "%"))
RECORDED = "val loss"  # the one scoring of a single-task run: the val_loss its Records carry


def seed_config(cfg: TrainConfig, study_dir: Path, seed: int, progress: bool) -> TrainConfig:
    """The config of one seed's run: its own folder, its seed, early stopping off (every epoch is trained)."""
    return replace(cfg, runs_dir=str(study_dir), name=f"seed-{seed}", seed=seed, patience=None, progress=progress)


def run_state(cfg: TrainConfig) -> str:
    """"done" (a finished run of this config), "partial" (this config, stopped before its summary), "fresh"."""
    from training import checkpoint

    run_dir = Path(cfg.runs_dir) / cfg.name
    last = checkpoint.last_path(run_dir)
    if not last.exists():
        return "fresh"
    try:
        trained = checkpoint.load(last)["config"]
    except (ValueError, RuntimeError, OSError):  # not a checkpoint we can read: train it again
        return "fresh"
    wanted = cfg.to_dict()
    if {k: v for k, v in trained.items() if k != "progress"} != {k: v for k, v in wanted.items() if k != "progress"}:
        return "fresh"
    return "done" if (run_dir / "summary.json").exists() else "partial"


def ensure_run(cfg: TrainConfig, fresh: bool, say: Callable[[str], None]) -> tuple[Path, float]:
    """Train the seed's run unless a finished one of the same config is there (resume a stopped one); returns
    the run directory and its training time. The training's own lines go to train.log beside it."""
    from training.train import train

    run_dir = Path(cfg.runs_dir) / cfg.name
    state = "fresh" if fresh else run_state(cfg)
    if state == "done":
        seconds = float(json.loads((run_dir / "summary.json").read_text()).get("wall_time_s", 0.0))
        say(f"reused {run_dir} (trained in {seconds:.0f} s)")
        return run_dir, seconds
    say(f"{'resuming' if state == 'partial' else 'training'} {run_dir} ({cfg.epochs} epochs, seed {cfg.seed}) ...")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (run_dir / "train.log").open("a" if state == "partial" else "w") as log, contextlib.redirect_stdout(log):
        train(cfg, resume=state == "partial")
    seconds = time.perf_counter() - started
    say(f"trained {run_dir} in {seconds:.0f} s")
    return run_dir, seconds


def metrics_of(summary: dict[str, Any]) -> tuple[Metric, ...]:
    """The test metrics of a run, the primary first: per task for a multi-task run."""
    if "multitask" in summary:
        found = []
        for task in summary["multitask"]["tasks"]:
            name = task["name"]
            if task["kind"] == "classification":
                found += [Metric(f"{name}_accuracy", f"{name} accuracy", True, "points"),
                          Metric(f"{name}_loss", f"{name} cross-entropy", False, "nats")]
            else:
                found.append(Metric(f"{name}_mae", f"{name} MAE", False, "%"))
        return tuple(found)
    return REGRESSION if "test_mse" in summary["selected"] else CLASSIFICATION


def read_run(run_dir: Path, seed: int) -> tuple[StudyRun, tuple[Metric, ...]]:
    """The study's view of a finished run, from its files alone."""
    selection = json.loads((run_dir / "selection.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    records = tuple(Record(**r) for r in selection["records"])
    metrics = metrics_of(summary)
    if "multitask" in summary:
        scorings, test = multitask_scorings(run_dir, summary, len(records)), multitask_test(summary, metrics)
    else:
        scorings = {RECORDED: (tuple(r.val_loss for r in records), float(selection["baseline_loss"]))}
        test = {m.name: tuple(float(c[m.name]) for c in summary["checkpoints"]) for m in metrics}
    return StudyRun(seed, os.path.relpath(run_dir), records, scorings, test), metrics  # no home folder in docs


Scorings = dict[str, tuple[tuple[float, ...], float]]  # scoring -> (val loss per record, baseline loss)


def multitask_scorings(run_dir: Path, summary: dict[str, Any], count: int) -> Scorings:
    """Both scorings of training/multitask/objective.py, from every evaluation's per-task validation losses and
    weights: normalized (mean_i L_i / L_i(0)) and weighted (sum_i w_i L_i; the weights were all 1 at the start)."""
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    evals = [m for m in lines if m["kind"] == "eval"]
    initial = summary["multitask"].get("initial_val_losses")
    if len(evals) != count or not initial:
        raise ValueError(f"{run_dir} is a multi-task run from before the study could rescore it (it needs every "
                         "evaluation's task losses and L_i(0)): train it again (gradserve study --fresh)")
    normalized = tuple(sum(m["tasks"][t]["loss"] / start for t, start in initial.items()) / len(initial) for m in evals)
    weighted = tuple(sum(w * m["tasks"][t]["loss"] for t, w in m["task_weights"].items()) for m in evals)
    return {"normalized": (normalized, 1.0), "weighted": (weighted, float(sum(initial.values())))}


def multitask_test(summary: dict[str, Any], metrics: tuple[Metric, ...]) -> dict[str, tuple[float, ...]]:
    """metric name ("class_accuracy", "ink_mae", ...) -> its value per checkpoint."""
    rows = summary["multitask"]["checkpoints"]
    out = {}
    for m in metrics:
        task, key = m.name.rsplit("_", 1)
        out[m.name] = tuple(float(row[task][key]) for row in rows)
    return out
