"""Equal weights vs GradNorm on the same seed and data: `gradserve train --config gradserve-multitask.yaml --compare`.

Trains runs/<name>-equal and runs/<name>-gradnorm, then writes runs/<name>-comparison/ with summary.json (the
per-task test metrics side by side, of the selected and of the last checkpoint), comparison.png (the weights'
trajectories and per-task validation metrics) and comparison.md (the table that is also printed).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradserve.errors import UsageError
from training.config import TrainConfig
from training.datasets import load_splits
from training.multitask.report import write_comparison_plot
from training.summary import write_json
from training.train import train

METHODS = ("equal", "gradnorm")


def compare(cfg: TrainConfig) -> Path:
    if cfg.multitask is None:
        raise UsageError("--compare needs a train config with a multitask: section (see gradserve-multitask.yaml)")
    data = load_splits(cfg)  # one split for both runs
    runs = {}
    for method in METHODS:
        run_cfg = replace(cfg, name=f"{cfg.name}-{method}", multitask=replace(cfg.multitask, method=method))
        runs[method] = train(run_cfg, data)
    out = Path(cfg.runs_dir) / f"{cfg.name}-comparison"
    out.mkdir(parents=True, exist_ok=True)
    doc = side_by_side({m: json.loads((r / "summary.json").read_text()) for m, r in runs.items()})
    doc = {"seed": cfg.seed, "alpha": cfg.multitask.alpha, "runs": {m: str(r) for m, r in runs.items()}, **doc}
    write_json(out / "summary.json", doc)
    write_comparison_plot(runs, out / "comparison.png")
    table = markdown(doc)
    (out / "comparison.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/summary.json, comparison.png, comparison.md")
    return out


def side_by_side(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"test": {checkpoint: {task: {metric: {method: value}}}}, "final_weights": ..., "selected_step": ...}."""
    first = next(iter(summaries.values()))["multitask"]["test"]
    test = {
        which: {
            task: {metric: {m: s["multitask"]["test"][which][task][metric] for m, s in summaries.items()}
                   for metric in first[which][task]}
            for task in first[which]
        }
        for which in first
    }
    return {
        "test": test,
        "final_weights": {m: s["multitask"]["final_weights"] for m, s in summaries.items()},
        "selected_step": {m: s["selected"]["step"] for m, s in summaries.items()},
        "rule_satisfied": {m: s["selection"]["rule_satisfied"] for m, s in summaries.items()},
    }


def markdown(doc: dict[str, Any]) -> str:
    methods = list(doc["final_weights"])
    lines = [f"| checkpoint | task | test metric | {' | '.join(methods)} |", "|---|---|---|" + "---:|" * len(methods)]
    for which, tasks in doc["test"].items():
        for task, metrics in tasks.items():
            for metric, values in metrics.items():
                cells = " | ".join(f"{values[m]:.4f}" for m in methods)
                lines.append(f"| {which} | {task} | {metric} | {cells} |")
    weights = " | ".join(", ".join(f"{t} {w:.3f}" for t, w in doc["final_weights"][m].items()) for m in methods)
    steps = " | ".join(str(doc["selected_step"][m]) for m in methods)
    lines.append(f"| selected | - | step (rule satisfied) | {steps} |")
    lines.append(f"| last | - | final weights | {weights} |")
    return "\n".join(lines)
