"""Plots of multi-task runs, from their metrics.jsonl alone.

tasks.png       one run: per-task loss L_i, per-task gradient norm G_i on the last shared layer, weight w_i
comparison.png  several runs (equal vs gradnorm): the weights' trajectories and per-task validation metrics
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402

from training.report import ema  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return [m for m in lines if m["kind"] == "iter"], [m for m in lines if m["kind"] == "eval"]


def write_task_report(run_dir: Path) -> Path:
    iters, _ = read_metrics(run_dir)
    tasks = list(iters[0]["task_weights"])
    x = [m["iteration"] for m in iters]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    panels = (
        ("task_losses", "training loss L_i (EMA)", True),
        ("task_grad_norms", "G_i = ||grad_W (w_i L_i)|| (EMA)", True),
        ("task_weights", "task weight w_i (log)", False),
    )
    for ax, (key, label, smooth) in zip(axes, panels, strict=True):
        for task in tasks:
            values = [m[key][task] for m in iters]
            ax.plot(x, ema(values) if smooth else values, label=task)
        ax.set_ylabel(label)
        ax.set_yscale("log")  # the weights too: GradNorm may move one by two orders of magnitude
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("iteration")
    axes[0].set_title(f"{run_dir.name}: per-task losses, gradient norms on the last shared layer, weights")
    fig.tight_layout()
    path = run_dir / "tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison_plot(runs: dict[str, Path], path: Path) -> Path:
    """Weights per iteration and per-task validation metric per evaluation, one line style per run."""
    data = {label: read_metrics(run) for label, run in runs.items()}
    tasks = list(next(iter(data.values()))[0][0]["task_weights"])
    fig, axes = plt.subplots(1 + len(tasks), 1, figsize=(10, 3 * (1 + len(tasks))), sharex=True)
    styles = dict(zip(runs, ("--", "-", ":", "-."), strict=False))
    colors = {t: f"C{i}" for i, t in enumerate(tasks)}
    for label, (iters, evals) in data.items():
        x = [m["iteration"] for m in iters]
        for task in tasks:
            axes[0].plot(x, [m["task_weights"][task] for m in iters], styles[label], color=colors[task],
                         label=f"{label}: w_{task}")
        for ax, task in zip(axes[1:], tasks, strict=True):
            metric = "mae" if "mae" in evals[0]["tasks"][task] else "accuracy"
            ax.plot([m["iteration"] for m in evals], [m["tasks"][task][metric] for m in evals], styles[label],
                    color=colors[task], marker="o", markersize=2, label=label)
            ax.set_ylabel(f"{task}: val {metric}")
    axes[0].set_ylabel("task weight w_i (log)")
    axes[0].set_yscale("log")
    axes[0].set_title("task weights and per-task validation metrics: " + " vs ".join(runs))
    axes[-1].set_xlabel("iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
