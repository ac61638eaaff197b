"""Which checkpoint each strategy keeps, on one run's records: pure functions, no torch (like selection.py).

A run is seen through a `RunView`: the records the rule reads (cut where early stopping would have stopped, for
that variant) and every checkpoint's test scores, parallel to them. The strategies:

rule       select_checkpoint with the configured SelectionRule
rule-grid  select_checkpoint with the grid point `pick_grid` chose on the validation split
best-val   the lowest finite validation loss (earliest on ties): what most trainers keep
last       the last checkpoint: what a trainer without checkpointing keeps
oracle     the best test metric (earliest on ties): hindsight, the yardstick of every gap, never a real choice
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from training.selection import Record, SelectionRule, peak_index, select_checkpoint

STRATEGIES = ("rule", "rule-grid", "best-val", "last", "oracle")
LABELS = {"rule": "rule (configured)", "rule-grid": "rule (grid, picked on val)", "best-val": "best validation loss",
          "last": "last checkpoint", "oracle": "oracle (hindsight)"}
# The grid the rule's parameters are picked from; loss_ratio stays the configured one (the gate is a floor).
GRID = {"decline_window": (2, 3, 5), "tolerance": (0.01, 0.03, 0.1), "strategy": ("best", "first")}


@dataclass(frozen=True)
class Metric:
    """A test metric and how a gap to the oracle is counted: accuracy in points, losses in their own units,
    regression errors in % of the oracle's value (their units differ from one data set to the next)."""

    name: str  # key of the per-checkpoint test scores, e.g. "test_accuracy"
    label: str  # for people: "test accuracy"
    higher_is_better: bool
    unit: str  # of the gap: "points", "nats", "%"

    def gap(self, value: float, best: float) -> float:
        """How far `value` is behind `best` (>= 0 when `best` is the best), in `unit`."""
        if self.unit == "points":
            return 100 * (best - value) if self.higher_is_better else 100 * (value - best)
        if self.unit == "%":
            behind = best - value if self.higher_is_better else value - best
            return 100 * behind / abs(best) if best else math.inf
        return best - value if self.higher_is_better else value - best

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class RunView:
    """One run as one variant of the study sees it."""

    seed: int
    records: tuple[Record, ...]  # what the rule reads; val_loss in the variant's scoring
    baseline_loss: float  # the untrained model's val loss, in the same scoring
    test: dict[str, tuple[float, ...]]  # metric name -> its test value per checkpoint, parallel to records

    def cut(self, length: int) -> RunView:
        """The first `length` records and their checkpoints: the run as it would have stopped."""
        return replace(self, records=self.records[:length], test={k: v[:length] for k, v in self.test.items()})


def early_stop_length(val_losses: Sequence[float], patience: int, min_delta: float) -> int:
    """How many records a run with early stopping would have written: training/train.py's early_stopping on the
    same validation losses (a NaN never improves). The learning-rate schedule spans the configured epochs either
    way, so an early-stopped run is exactly the first records of the same run without it."""
    best, since = math.inf, 0
    for n, v in enumerate(val_losses, start=1):
        if v < best - min_delta:
            best, since = v, 0
        else:
            since += 1
        if since >= patience:
            return n
    return len(val_losses)


def best_val_index(records: Sequence[Record]) -> int:
    finite = [i for i, r in enumerate(records) if math.isfinite(r.val_loss)]
    return min(finite, key=lambda i: (records[i].val_loss, i))


def oracle_index(values: Sequence[float], metric: Metric) -> int:
    """The best test value (earliest on ties; NaN never wins)."""
    best = None
    for i, v in enumerate(values):
        if math.isfinite(v) and (best is None or metric.better(v, values[best])):
            best = i
    return 0 if best is None else best


def choices(view: RunView, rule: SelectionRule, grid_rule: SelectionRule, primary: Metric) -> dict[str, int]:
    """strategy -> the index of the checkpoint it keeps."""
    return {
        "rule": select_checkpoint(view.records, view.baseline_loss, rule).index,
        "rule-grid": select_checkpoint(view.records, view.baseline_loss, grid_rule).index,
        "best-val": best_val_index(view.records),
        "last": len(view.records) - 1,
        "oracle": oracle_index(view.test[primary.name], primary),
    }


def outcomes(view: RunView, rule: SelectionRule, grid_rule: SelectionRule,
             metrics: Sequence[Metric]) -> dict[str, Any]:
    """strategy -> {index, step, evals_after_peak, rule_satisfied (rules only), value: {metric}, gap: {metric}};
    each metric's gap is to that metric's best checkpoint of this view."""
    peak = peak_index([r.grad_norm for r in view.records])
    satisfied = {"rule": select_checkpoint(view.records, view.baseline_loss, rule).rule_satisfied,
                 "rule-grid": select_checkpoint(view.records, view.baseline_loss, grid_rule).rule_satisfied}
    best = {m.name: view.test[m.name][oracle_index(view.test[m.name], m)] for m in metrics}
    out: dict[str, Any] = {}
    for strategy, i in choices(view, rule, grid_rule, metrics[0]).items():
        values = {m.name: view.test[m.name][i] for m in metrics}
        out[strategy] = {
            "index": i, "step": view.records[i].step, "val_loss": view.records[i].val_loss,
            "evals_after_peak": None if peak is None else i - peak,
            **({"rule_satisfied": satisfied[strategy]} if strategy in satisfied else {}),
            "value": values, "gap": {m.name: m.gap(values[m.name], best[m.name]) for m in metrics},
        }
    return out


def grid_rules(configured: SelectionRule) -> list[SelectionRule]:
    """The configured rule first, then every grid point (the configured one not twice)."""
    points = [SelectionRule(k, tau, configured.loss_ratio, s) for k, tau, s in itertools.product(*GRID.values())]
    return [configured, *(p for p in points if p != configured)]


def pick_grid(views: Sequence[RunView], configured: SelectionRule) -> tuple[SelectionRule, list[dict[str, Any]]]:
    """The grid point whose choices have the lowest mean *validation* loss over the runs (one setting for the
    config, as a user would write it in gradserve.yaml); ties go to the earlier point, the configured rule first.
    Only points under which the rule was satisfied in at least half the runs compete (all, when none is): a
    setting that mostly falls back is best-validation under another name, not the rule. The test split is never
    looked at. Returns the point and the table it was picked from."""
    table = []
    for rule in grid_rules(configured):
        picks = [select_checkpoint(v.records, v.baseline_loss, rule) for v in views]
        table.append({"rule": rule, "mean_val_loss": statistics.fmean(v.records[p.index].val_loss
                                                                      for v, p in zip(views, picks, strict=True)),
                      "satisfied": sum(p.rule_satisfied for p in picks)})
    competing = [i for i, row in enumerate(table) if 2 * row["satisfied"] >= len(views)] or list(range(len(table)))
    best = min(competing, key=lambda i: (table[i]["mean_val_loss"], i))
    return table[best]["rule"], table


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min, max and count of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "min": min(finite), "max": max(finite), "n": len(finite)}
