"""From the runs of a study to its numbers: pure, no torch, no files (runs.py reads them, study.py writes).

Each run is seen through every *variant*: a scoring of its records (single-task runs have one, the validation
loss; multi-task runs two, training/multitask/objective.py) times early stopping on (the records cut where it
would have stopped) and off (all of them). Per variant: the grid point picked on validation over all the runs,
then per run what every strategy keeps and how far it lands from the oracle, and over the runs mean and spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from training.selection import Record, SelectionRule, peak_index
from training.study.strategies import (
    STRATEGIES,
    Metric,
    RunView,
    early_stop_length,
    outcomes,
    pick_grid,
    spread,
)


@dataclass(frozen=True)
class StudyRun:
    """What the study reads from one seed's run (runs.py)."""

    seed: int
    run_dir: str
    records: tuple[Record, ...]  # as selection.json holds them
    scorings: dict[str, tuple[tuple[float, ...], float]]  # scoring -> (val loss per record, baseline loss)
    test: dict[str, tuple[float, ...]]  # metric name -> test value per checkpoint, parallel to records

    def view(self, scoring: str) -> RunView:
        vals, baseline = self.scorings[scoring]
        records = tuple(Record(r.step, r.grad_norm, r.train_loss, v) for r, v in zip(self.records, vals, strict=True))
        return RunView(self.seed, records, baseline, self.test)


@dataclass(frozen=True)
class Variant:
    scoring: str
    patience: int | None  # None: early stopping off

    @property
    def key(self) -> str:
        return f"{self.scoring}/" + (f"patience-{self.patience}" if self.patience else "no-early-stopping")

    def label(self, several_scorings: bool) -> str:
        stopping = f"early stopping (patience {self.patience})" if self.patience else "no early stopping"
        return f"{stopping}, scored by {self.scoring}" if several_scorings else stopping


def views_of(runs: Sequence[StudyRun], variant: Variant, min_delta: float) -> list[RunView]:
    views = []
    for run in runs:
        full = run.view(variant.scoring)
        vals = [r.val_loss for r in full.records]
        length = early_stop_length(vals, variant.patience, min_delta) if variant.patience else len(vals)
        views.append(full.cut(length))
    return views


def analyse_variant(runs: Sequence[StudyRun], variant: Variant, rule: SelectionRule, min_delta: float,
                    metrics: Sequence[Metric]) -> dict[str, Any]:
    """One variant: the grid point, each run's strategies, and their aggregate."""
    views = views_of(runs, variant, min_delta)
    grid_rule, table = pick_grid(views, rule)
    per_run = []
    for run, view in zip(runs, views, strict=True):
        peak = peak_index([r.grad_norm for r in view.records])
        per_run.append({"seed": run.seed, "run_dir": run.run_dir, "records": len(view.records),
                        "last_step": view.records[-1].step,
                        "peak_step": None if peak is None else view.records[peak].step,
                        "strategies": outcomes(view, rule, grid_rule, metrics)})
    return {
        "key": variant.key, "scoring": variant.scoring, "patience": variant.patience,
        "grid_rule": asdict(grid_rule),
        "grid_table": [{**asdict(row["rule"]), "mean_val_loss": row["mean_val_loss"], "satisfied": row["satisfied"]}
                       for row in table],
        "runs": per_run,
        "aggregate": aggregate(per_run, metrics),
    }


def aggregate(per_run: list[dict[str, Any]], metrics: Sequence[Metric]) -> dict[str, Any]:
    """Per strategy over the runs: the spread of each metric's value and gap, of the evaluations after the peak,
    how often the rule was satisfied, and (rules) how often it beat, tied or lost to best-val and last."""
    out: dict[str, Any] = {}
    primary = metrics[0]
    for s in STRATEGIES:
        rows = [r["strategies"][s] for r in per_run]
        entry: dict[str, Any] = {
            "gap": {m.name: spread([row["gap"][m.name] for row in rows]) for m in metrics},
            "value": {m.name: spread([row["value"][m.name] for row in rows]) for m in metrics},
            "evals_after_peak": spread([row["evals_after_peak"] for row in rows]),
        }
        if "rule_satisfied" in rows[0]:
            entry["rule_satisfied"] = sum(row["rule_satisfied"] for row in rows)
            entry["versus"] = {other: versus(per_run, s, other, primary) for other in ("best-val", "last")}
        out[s] = entry
    return out


def versus(per_run: list[dict[str, Any]], strategy: str, other: str, metric: Metric) -> dict[str, Any]:
    """Seed by seed on the primary metric: better / same / worse than `other`, and the mean of the gap
    differences (negative: `strategy` is closer to the oracle)."""
    diffs = [r["strategies"][strategy]["gap"][metric.name] - r["strategies"][other]["gap"][metric.name]
             for r in per_run]
    close = 1e-9
    return {"better": sum(d < -close for d in diffs), "same": sum(abs(d) <= close for d in diffs),
            "worse": sum(d > close for d in diffs), "mean_gap_difference": spread(diffs)["mean"]}


def analyse(runs: Sequence[StudyRun], rule: SelectionRule, patience: int, min_delta: float,
            metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    """Every variant of the study, early stopping on before off, per scoring."""
    if not runs:
        raise ValueError("a study needs at least one run")
    variants = [Variant(s, p) for s in runs[0].scorings for p in (patience, None)]
    return [analyse_variant(runs, v, rule, min_delta, metrics) for v in variants]


def curve(run: StudyRun, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's records (all of them) and where every variant's strategies chose: what study.png draws."""
    chosen = {}
    for v in variants:
        row = next(r for r in v["runs"] if r["seed"] == run.seed)
        chosen[v["key"]] = {"last_step": row["last_step"],
                            **{s: row["strategies"][s]["step"] for s in STRATEGIES}}
    return {"seed": run.seed, "step": [r.step for r in run.records],
            "grad_norm": [r.grad_norm if math.isfinite(r.grad_norm) else None for r in run.records],
            "val_loss": {s: list(vals) for s, (vals, _) in run.scorings.items()}, "chosen": chosen}
