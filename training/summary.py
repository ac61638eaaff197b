"""What a finished run leaves beside its checkpoints: selection.json (the rule's choice) and summary.json
(test scores of the selected, last and best-validation checkpoints, and a fit diagnosis with its numbers)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradserve.errors import UsageError
from handlers.factory import ModelSpec
from training import checkpoint
from training.data import Splits
from training.evaluate import score
from training.selection import Record, Selection, SelectionRule, select_checkpoint

UNDERFIT_ACCURACY = 0.90  # train and validation accuracy both below this: underfitting
OVERFIT_GAP = 0.05  # train accuracy this far above validation/test accuracy: overfitting
OVERFIT_VAL_RISE = 0.25  # validation loss this far (relative) above its minimum while train loss fell: overfitting


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def write_selection(
    run_dir: Path, records: list[Record], checkpoints: list[str], baseline_loss: float, rule: SelectionRule
) -> Selection:
    selection = select_checkpoint(records, baseline_loss, rule)
    doc = {
        "selection": asdict(selection),
        "rule": asdict(rule),
        "baseline_loss": baseline_loss,
        "records": [asdict(r) for r in records],
        "checkpoints": checkpoints,  # parallel to records
    }
    write_json(run_dir / "selection.json", doc)
    return selection


def read_selection(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "selection.json"
    if not path.exists():
        raise UsageError(f"{path} does not exist: is {run_dir} a finished training run?")
    doc = json.loads(path.read_text())
    doc["records"] = [Record(**r) for r in doc["records"]]
    doc["rule"] = SelectionRule(**doc["rule"])
    return doc


def load_model(path: Path, device: torch.device) -> nn.Module:
    """The model of a checkpoint, rebuilt by its factory (handlers/factory.py) with its weights."""
    ckpt = checkpoint.load(path)
    model = ModelSpec.from_dict(ckpt["model_config"]).build()
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device)


# The headline metric of a task in summary.json, and the diagnosis' limits on it.
METRIC = {"classification": "accuracy", "regression": "r2"}
UNDERFIT = {"accuracy": UNDERFIT_ACCURACY, "r2": 0.5}  # train and validation both below: underfitting
OVERFIT = {"accuracy": OVERFIT_GAP, "r2": 0.10}  # train this far above validation/test: overfitting
WORDS = {"accuracy": "accuracy", "r2": "R²"}


def diagnose(train_acc: float, val_acc: float, test_acc: float, records: list[Record],
             metric: str = "accuracy") -> dict[str, Any]:
    """Underfitting, overfitting or a good fit, with the numbers that decided it; `metric` is accuracy
    (classification) or r2 (regression), higher is better for both."""
    v = [r.val_loss if math.isfinite(r.val_loss) else math.inf for r in records]
    t = [r.train_loss for r in records]
    best = v.index(min(v))
    val_rise = (v[-1] - v[best]) / v[best] if v[best] > 0 else 0.0
    train_fell = math.isfinite(t[-1]) and math.isfinite(t[best]) and t[-1] < t[best]
    gap = train_acc - min(val_acc, test_acc)
    numbers = {
        f"train_{metric}": train_acc,
        f"val_{metric}": val_acc,
        f"test_{metric}": test_acc,
        "generalization_gap": gap,
        "val_loss_rise_after_best": val_rise,
        "train_loss_fell_after_best": train_fell,
    }
    word, floor, limit = WORDS[metric], UNDERFIT[metric], OVERFIT[metric]
    if train_acc < floor and val_acc < floor:
        verdict = "underfitting"
        why = f"train {word} {train_acc:.3f} and validation {word} {val_acc:.3f} are both below {floor}"
    elif gap > limit or (val_rise > OVERFIT_VAL_RISE and train_fell):
        verdict = "overfitting"
        why = (
            f"train {word} {train_acc:.3f} vs validation/test {min(val_acc, test_acc):.3f} (gap {gap:.3f}, limit "
            f"{limit}); validation loss ended {val_rise:.1%} above its minimum while train loss "
            f"{'fell' if train_fell else 'did not fall'}"
        )
    else:
        verdict = "good fit"
        why = (
            f"train {word} {train_acc:.3f}, validation {val_acc:.3f}, test {test_acc:.3f}: gap {gap:.3f} <= "
            f"{limit}, validation loss ended {val_rise:.1%} above its minimum"
        )
    return {"verdict": verdict, "reason": why, **numbers}


def summarize(run_dir: Path, data: Splits, device: torch.device, run_info: dict[str, Any]) -> dict[str, Any]:
    """Score every checkpoint on the test split and write summary.json (run_info is copied in as is)."""
    doc = read_selection(run_dir)
    records: list[Record] = doc["records"]
    metric = METRIC[data.task]
    scores = []
    for record, rel in zip(records, doc["checkpoints"], strict=True):
        test = score(load_model(run_dir / rel, device), data.test, device, data)
        scores.append({"step": record.step, "checkpoint": rel, "val_loss": record.val_loss,
                       **{f"test_{k}": v for k, v in test.items()}})
    chosen = doc["selection"]["index"]
    finite_val = [i for i, r in enumerate(records) if math.isfinite(r.val_loss)]
    best_val = min(finite_val, key=lambda i: (records[i].val_loss, i))

    model = load_model(run_dir / doc["checkpoints"][chosen], device)
    train_score = score(model, data.train, device, data)[metric]
    val_score = score(model, data.val, device, data)[metric]
    best_test = max(s[f"test_{metric}"] for s in scores)
    below = best_test - scores[chosen][f"test_{metric}"]
    summary = {
        **run_info,
        "baseline_loss": doc["baseline_loss"],
        "selection": doc["selection"],
        "selected": scores[chosen],
        "last": scores[-1],
        "best_val": scores[best_val],
        f"best_test_{metric}": best_test,
        **({"selected_test_accuracy_below_best_points": 100 * below} if metric == "accuracy"
           else {"selected_test_r2_below_best": below}),
        "diagnosis": diagnose(train_score, val_score, scores[chosen][f"test_{metric}"], records, metric),
        "checkpoints": scores,
    }
    write_json(run_dir / "summary.json", summary)
    return summary
