"""`gradserve study`: its arithmetic on hand-made records (each strategy's choice, gaps to the hindsight oracle,
the early-stopping cut, the grid picked on validation and never on test), the multi-task scorings, the
label-noise knob, the eligible records shaded in report.png, and a tiny real study reused on its second call."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from gradserve.cli import main as gradserve_main
from training.config import TrainConfig
from training.datasets import load_splits
from training.selection import Record, SelectionRule, select_checkpoint
from training.study.analysis import StudyRun, analyse
from training.study.strategies import Metric, RunView, early_stop_length, grid_rules, outcomes, pick_grid

ACCURACY = Metric("test_accuracy", "test accuracy", True, "points")
LOSS = Metric("test_loss", "test cross-entropy", False, "nats")
MSE = Metric("test_mse", "test MSE", False, "%")
TINY = {"factory": "training.model:build_convnet", "args": {"channels": [8, 16], "norm": "batch", "dropout": 0.0}}


def records(norms: list[float], vals: list[float]) -> tuple[Record, ...]:
    return tuple(Record(step=10 * (i + 1), grad_norm=g, train_loss=1.0, val_loss=v)
                 for i, (g, v) in enumerate(zip(norms, vals, strict=True)))


# peak at 1; settled from index 4 on (window 3); val lowest at 3 (not yet settled), then 5 among the eligible
NORMS = [1.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.55]
VALS = [2.0, 1.0, 0.8, 0.50, 0.70, 0.60, 0.65, 0.66]
ACC = [0.50, 0.80, 0.85, 0.88, 0.90, 0.89, 0.93, 0.91]


def view(norms: list[float] = NORMS, vals: list[float] = VALS, acc: list[float] = ACC, seed: int = 0) -> RunView:
    return RunView(seed, records(norms, vals), 2.3, {"test_accuracy": tuple(acc),
                                                     "test_loss": tuple(1 - a for a in acc)})


def test_each_strategy_keeps_its_checkpoint_and_gaps_are_to_the_hindsight_oracle() -> None:
    got = outcomes(view(), SelectionRule(), SelectionRule(), [ACCURACY, LOSS])
    assert {s: o["index"] for s, o in got.items()} == {"rule": 5, "rule-grid": 5, "best-val": 3, "last": 7,
                                                      "oracle": 6}
    assert got["rule"]["gap"]["test_accuracy"] == pytest.approx(100 * (0.93 - 0.89))  # points
    assert got["best-val"]["gap"]["test_accuracy"] == pytest.approx(5.0)
    assert got["last"]["gap"]["test_accuracy"] == pytest.approx(2.0)
    assert got["oracle"]["gap"] == {"test_accuracy": 0.0, "test_loss": 0.0}
    assert got["rule"]["gap"]["test_loss"] == pytest.approx(0.04)  # to the loss's own best checkpoint (6)
    assert got["rule"]["rule_satisfied"] and got["rule"]["evals_after_peak"] == 4
    assert "rule_satisfied" not in got["last"]
    assert got["rule"]["step"] == 60 and got["best-val"]["val_loss"] == 0.5


def test_gap_units() -> None:
    assert ACCURACY.gap(0.97, 0.99) == pytest.approx(2.0)  # points of accuracy
    assert MSE.gap(110.0, 100.0) == pytest.approx(10.0)  # % of the oracle's error
    assert LOSS.gap(0.30, 0.25) == pytest.approx(0.05)  # in the loss's own units
    assert MSE.gap(100.0, 100.0) == 0.0 and ACCURACY.gap(0.5, 0.5) == 0.0


@pytest.mark.parametrize(("vals", "patience", "min_delta", "length"), [
    ([3, 2, 1, 1.5, 1.4, 1.3, 0.5], 3, 0.0, 6),  # three evaluations without a new best: stops at the sixth
    ([3, 2, 1, 1.5, 1.4, 0.5, 0.4], 3, 0.0, 7),  # a new best in time: runs to the end
    ([3, 2.9999, 2.9998, 2.9997], 2, 0.01, 3),  # improvements below min_delta do not count
    ([3, math.nan, math.nan], 2, 0.0, 3),  # a NaN never improves
    ([1.0], 1, 0.0, 1),
])
def test_early_stop_length_is_the_training_loops_rule(vals: list[float], patience: int, min_delta: float,
                                                      length: int) -> None:
    assert early_stop_length(vals, patience, min_delta) == length


def test_the_grid_point_is_picked_on_validation_even_when_test_prefers_another() -> None:
    """Two runs where strategy "first" keeps a checkpoint with a better *test* accuracy but a worse *validation*
    loss than "best": the study must keep the val-best grid point, whatever the test split says."""
    vals = [2.0, 1.5, 1.2, 1.0, 0.9, 0.4, 0.5, 0.6]  # eligible from 4 on: first -> 4, best -> 5 (val 0.4)
    acc = [0.5, 0.6, 0.7, 0.8, 0.95, 0.85, 0.86, 0.87]  # the test split prefers 4
    views = [view(vals=vals, acc=acc, seed=s) for s in (0, 1)]
    chosen, table = pick_grid(views, SelectionRule(strategy="first"))
    assert chosen.strategy == "best"
    by_val = min(table, key=lambda row: row["mean_val_loss"])["rule"]
    by_test = max(grid_rules(SelectionRule()), key=lambda r: sum(v.test["test_accuracy"][
        select_checkpoint(v.records, v.baseline_loss, r).index] for v in views))
    assert by_test.strategy == "first" and by_test != chosen and by_val == chosen  # the two splits disagree
    got = outcomes(views[0], SelectionRule(strategy="first"), chosen, [ACCURACY])
    assert got["rule"]["index"] == 4 and got["rule-grid"]["index"] == 5
    assert got["rule-grid"]["gap"]["test_accuracy"] == pytest.approx(10.0)  # the honest price of picking on val


def test_a_grid_point_that_mostly_falls_back_does_not_compete() -> None:
    """window 5 never settles in these records (a rise at index 6 sits in every window of 5 after the peak), so
    it falls back to the lowest validation loss (index 7): the lowest mean validation loss of the grid, but that
    is best-validation under another name, not the rule."""
    norms, vals = [1, 3, 2.9, 2.8, 2.7, 2.6, 2.9, 2.8], [2, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.3]
    chosen, table = pick_grid([view(norms, vals), view(norms, vals, seed=1)], SelectionRule())
    never = [row for row in table if row["rule"].decline_window == 5]
    assert all(row["satisfied"] == 0 for row in never)
    assert min(table, key=lambda row: row["mean_val_loss"])["rule"].decline_window == 5
    assert chosen == SelectionRule() and select_checkpoint(records(norms, vals), 2.3, chosen).index == 5


def test_the_configured_rule_wins_ties_in_the_grid() -> None:
    chosen, table = pick_grid([view()], SelectionRule(decline_window=2, tolerance=0.1))
    assert chosen == SelectionRule(decline_window=2, tolerance=0.1) and table[0]["rule"] == chosen
    assert len(table) == 18 and len({row["rule"] for row in table}) == 18


def test_analyse_cuts_early_stopping_and_aggregates_over_runs() -> None:
    def run(seed: int, acc: list[float]) -> StudyRun:
        return StudyRun(seed, f"runs/seed-{seed}", records(NORMS, VALS), {"val loss": (tuple(VALS), 2.3)},
                        {"test_accuracy": tuple(acc), "test_loss": tuple(1 - a for a in acc)})

    variants = analyse([run(0, ACC), run(1, [*ACC[:5], 0.95, 0.93, 0.91])], SelectionRule(), 3, 0.0, [ACCURACY, LOSS])
    on, off = variants
    assert (on["key"], off["key"]) == ("val loss/patience-3", "val loss/no-early-stopping")
    assert [r["records"] for r in on["runs"]] == [7, 7]  # best at 3, then 4, 5, 6 without: stop after the 7th
    assert [r["records"] for r in off["runs"]] == [8, 8]
    rule_off = off["aggregate"]["rule"]
    assert rule_off["gap"]["test_accuracy"]["mean"] == pytest.approx(2.0)  # seed 0: 4 points, seed 1: 0
    assert rule_off["gap"]["test_accuracy"]["std"] == pytest.approx(math.sqrt(8))
    assert rule_off["rule_satisfied"] == 2
    assert rule_off["versus"]["best-val"] == {"better": 2, "same": 0, "worse": 0, "mean_gap_difference":
                                              pytest.approx(-4.0)}
    on_oracle = [r["strategies"]["oracle"]["index"] for r in on["runs"]]
    assert on_oracle == [6, 5]  # the cut run's oracle can only pick what that run saved (not 7)
    assert on["runs"][0]["strategies"]["last"]["index"] == 6


def test_label_noise_flips_training_labels_only_and_never_to_the_true_class() -> None:
    clean = load_splits(TrainConfig())
    noisy = load_splits(TrainConfig(data={"label_noise": 0.2}))  # type: ignore[arg-type]
    changed = noisy.train.y != clean.train.y
    assert int(changed.sum()) == round(0.2 * len(clean.train))  # exactly the share, each to another class
    assert torch.equal(noisy.val.y, clean.val.y) and torch.equal(noisy.test.y, clean.test.y)
    assert torch.equal(noisy.train.x, clean.train.x) and noisy.sources["label_noise"]["share"] == 0.2
    again = load_splits(TrainConfig(data={"label_noise": 0.2}))  # type: ignore[arg-type]
    assert torch.equal(again.train.y, noisy.train.y)  # seeded
    other = load_splits(TrainConfig(seed=1, data={"label_noise": 0.2}))  # type: ignore[arg-type]
    assert int((other.train.y != load_splits(TrainConfig(seed=1)).train.y).sum()) == changed.sum()
    with pytest.raises(ValueError, match="label_noise"):
        TrainConfig(data={"label_noise": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_noise"):
        TrainConfig(task="regression", data={"kind": "npz", "path": "x.npz", "label_noise": 0.1})  # type: ignore


def test_report_shades_every_record_that_met_the_rule() -> None:
    import matplotlib.pyplot as plt

    from training.report import shade_eligible

    fig, ax = plt.subplots()
    shade_eligible(ax, [10, 20, 30, 40, 50], [1, 2, 4])
    spans = [p.get_x() for p in ax.patches], [p.get_width() for p in ax.patches]
    plt.close(fig)
    assert spans == ([15, 25, 45], [10, 10, 5])  # half-way to the neighbours; the last one stops at its step


# ---- real runs ----------------------------------------------------------------------------------------------------


def study_config(tmp_path: Path, **train: object) -> Path:
    config = tmp_path / "gradserve.yaml"
    config.write_text(yaml.safe_dump({"train": {"name": "tiny", "runs_dir": "runs", "epochs": 3, "eval_every": 20,
                                                "warmup_steps": 5, "threads": 1, "progress": False, "model": TINY,
                                                "patience": 2, **train}}))
    return config


def test_a_tiny_study_scores_every_run_and_reuses_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = study_config(tmp_path)
    args = ["study", "--config", str(config), "--seeds", "2", "--no-progress"]
    assert gradserve_main(args) == 0
    first = capsys.readouterr().out
    assert first.count("): training ") == 2 and "): reused" not in first  # a line per run
    study_dir = tmp_path / "runs" / "tiny-study"
    doc = json.loads((study_dir / "study.json").read_text())
    assert (study_dir / "study.md").read_text().count("oracle (hindsight)") >= 2 and (study_dir / "study.png").exists()
    assert [v["key"] for v in doc["variants"]] == ["val loss/patience-2", "val loss/no-early-stopping"]
    off = doc["variants"][1]
    for seed, run in enumerate(off["runs"]):
        run_dir = study_dir / f"seed-{seed}"
        summary = json.loads((run_dir / "summary.json").read_text())
        selection = json.loads((run_dir / "selection.json").read_text())
        assert run["strategies"]["rule"]["index"] == selection["selection"]["index"]  # the run's own choice
        assert run["strategies"]["best-val"]["value"]["test_accuracy"] == summary["best_val"]["test_accuracy"]
        assert run["strategies"]["oracle"]["value"]["test_accuracy"] == summary["best_test_accuracy"]
        assert run["records"] == len(selection["records"]) == 3 * 40 // 20
    stamps = [p.stat().st_mtime_ns for p in sorted(study_dir.glob("seed-*/checkpoints/*.pt"))]

    assert gradserve_main(args) == 0
    second = capsys.readouterr().out
    assert second.count("): reused ") == 2 and "): training " not in second
    assert [p.stat().st_mtime_ns for p in sorted(study_dir.glob("seed-*/checkpoints/*.pt"))] == stamps
    assert json.loads((study_dir / "study.json").read_text())["variants"] == doc["variants"]


def test_the_cut_run_is_the_early_stopped_run(tmp_path: Path) -> None:
    """What the study calls early stopping on (the full run cut by early_stop_length) is what training with
    early stopping writes: the same records, the same number of them."""
    from training.train import train

    cfg = TrainConfig(runs_dir=str(tmp_path), epochs=6, eval_every=20, warmup_steps=5, threads=1, progress=False,
                      min_delta=0.02, model=TINY)  # type: ignore[arg-type]
    stopped = json.loads((train(replace(cfg, name="es", patience=2)) / "selection.json").read_text())["records"]
    full = json.loads((train(replace(cfg, name="full", patience=None)) / "selection.json").read_text())["records"]
    length = early_stop_length([r["val_loss"] for r in full], 2, 0.02)
    assert length < len(full), "the case needs early stopping to stop"
    assert stopped == full[:length]


def test_multitask_records_are_scored_on_a_fixed_scale_and_the_study_rescores_both_ways(tmp_path: Path) -> None:
    """A multi-task Record's val_loss is mean_i L_i / L_i(0) (the baseline is 1), not the weighted total whose
    weights GradNorm moves; the study recomputes both scorings from the run's files."""
    from training.study.runs import read_run
    from training.train import train

    cfg = TrainConfig(name="mt", runs_dir=str(tmp_path), epochs=2, eval_every=20, warmup_steps=5, lr=0.01,
                      threads=1, progress=False, patience=None, model=TINY,  # type: ignore[arg-type]
                      multitask={"method": "gradnorm", "tasks": ["class", "ink"]})  # type: ignore[arg-type]
    run_dir = train(cfg)
    selection = json.loads((run_dir / "selection.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    initial = summary["multitask"]["initial_val_losses"]
    assert selection["baseline_loss"] == pytest.approx(1.0) and summary["multitask"]["scoring"] == "normalized"
    evals = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in s]
    for m in evals:
        assert m["val_loss"] == pytest.approx(sum(m["tasks"][t]["loss"] / initial[t] for t in initial) / 2)
        assert m["weighted_val_loss"] == pytest.approx(sum(w * m["tasks"][t]["loss"]
                                                           for t, w in m["task_weights"].items()))
    run, metrics = read_run(run_dir, 0)
    assert [m.name for m in metrics] == ["class_accuracy", "class_loss", "ink_mae"]
    assert run.scorings["normalized"][0] == pytest.approx([m["val_loss"] for m in evals])
    assert run.scorings["weighted"] == (pytest.approx([m["weighted_val_loss"] for m in evals]),
                                        pytest.approx(sum(initial.values())))
    assert len(summary["multitask"]["checkpoints"]) == len(evals) == len(run.test["ink_mae"])
    assert run.test["class_accuracy"][-1] == summary["multitask"]["test"]["last"]["class"]["accuracy"]
    keys = [v["key"] for v in analyse([run], SelectionRule(), 8, 0.0, metrics)]
    assert keys == ["normalized/patience-8", "normalized/no-early-stopping", "weighted/patience-8",
                    "weighted/no-early-stopping"]
