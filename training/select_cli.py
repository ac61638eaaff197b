"""`gradserve select --run runs/<name> [rule flags]`: redo the checkpoint choice without retraining.

Rewrites selection.json (and report.png); refreshes summary.json's scores of the selected checkpoint when the
run's data can be rebuilt from its config (the bundled digits). Prints the new selection as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from gradserve.errors import UsageError
from training.selection import STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="the run directory, e.g. runs/digits")
    parser.add_argument("--decline-window", dest="decline_window", type=int, help="k: transitions that must not rise")
    parser.add_argument("--tolerance", type=float, help="tau: allowed relative rise per transition")
    parser.add_argument("--loss-ratio", dest="loss_ratio", type=float, help="rho: val_loss <= rho x baseline")
    parser.add_argument("--strategy", choices=STRATEGIES)


def main(args: argparse.Namespace) -> int:
    from training.summary import read_selection, write_selection

    doc = read_selection(args.run)
    overrides = {k: getattr(args, k) for k in ("decline_window", "tolerance", "loss_ratio", "strategy")}
    rule = dataclasses.replace(doc["rule"], **{k: v for k, v in overrides.items() if v is not None})
    try:
        selection = write_selection(args.run, doc["records"], doc["checkpoints"], doc["baseline_loss"], rule)
    except ValueError as e:
        raise UsageError(str(e)) from e
    refresh_outputs(args.run, selection.index)
    print(json.dumps({"selection": dataclasses.asdict(selection), "rule": dataclasses.asdict(rule)}, indent=2))
    return 0


def refresh_outputs(run_dir: Path, chosen: int) -> None:
    """Redraw report.png and rescore summary.json for the new choice (the digits data is rebuilt from the config),
    with what the run's objective adds (a multi-task run's per-task metrics and tasks.png)."""
    import torch

    from training import checkpoint
    from training.config import TrainConfig
    from training.datasets import load_splits
    from training.report import write_report
    from training.setup import put_code_on_path
    from training.summary import read_selection, summarize
    from training.train import objective_for

    cfg = TrainConfig.from_dict(checkpoint.load(checkpoint.last_path(run_dir))["config"])
    objective = objective_for(cfg)
    write_report(run_dir, loss_label=objective.report_label)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return
    put_code_on_path(cfg.code_dir, cfg.model.factory, cfg.data.factory)
    try:
        data = load_splits(cfg)  # the same split: the config's seed, and the same files
    except UsageError as e:
        print(f"summary.json left as it was: the run's data cannot be read again ({e})")
        return
    old = json.loads(summary_path.read_text())
    computed = {"baseline_loss", "selection", "selected", "last", "best_val", "best_test_accuracy", "best_test_r2",
                "selected_test_accuracy_below_best_points", "selected_test_r2_below_best", "diagnosis",
                "checkpoints", "multitask"}  # fmt: skip
    run_info = {k: v for k, v in old.items() if k not in computed}
    summary = summarize(run_dir, data, torch.device("cpu"), run_info)
    objective.finish(run_dir, summary, data, read_selection(run_dir)["checkpoints"], chosen, torch.device("cpu"))
