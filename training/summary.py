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
from training import checkpoint
from training.data import Splits
from training.evaluate import evaluate
from training.model import build_model
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
    ckpt = checkpoint.load(path)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device)


def diagnose(train_acc: float, val_acc: float, test_acc: float, records: list[Record]) -> dict[str, Any]:
    """Underfitting, overfitting or a good fit, with the numbers that decided it."""
    v = [r.val_loss if math.isfinite(r.val_loss) else math.inf for r in records]
    t = [r.train_loss for r in records]
    best = v.index(min(v))
    val_rise = (v[-1] - v[best]) / v[best] if v[best] > 0 else 0.0
    train_fell = math.isfinite(t[-1]) and math.isfinite(t[best]) and t[-1] < t[best]
    gap = train_acc - min(val_acc, test_acc)
    numbers = {
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "generalization_gap": gap,
        "val_loss_rise_after_best": val_rise,
        "train_loss_fell_after_best": train_fell,
    }
    if train_acc < UNDERFIT_ACCURACY and val_acc < UNDERFIT_ACCURACY:
        verdict = "underfitting"
        why = f"train accuracy {train_acc:.3f} and validation accuracy {val_acc:.3f} are both below {UNDERFIT_ACCURACY}"
    elif gap > OVERFIT_GAP or (val_rise > OVERFIT_VAL_RISE and train_fell):
        verdict = "overfitting"
        why = (
            f"train accuracy {train_acc:.3f} vs validation/test {min(val_acc, test_acc):.3f} (gap {gap:.3f}, limit "
            f"{OVERFIT_GAP}); validation loss ended {val_rise:.1%} above its minimum while train loss "
            f"{'fell' if train_fell else 'did not fall'}"
        )
    else:
        verdict = "good fit"
        why = (
            f"train accuracy {train_acc:.3f}, validation {val_acc:.3f}, test {test_acc:.3f}: gap {gap:.3f} <= "
            f"{OVERFIT_GAP}, validation loss ended {val_rise:.1%} above its minimum"
        )
    return {"verdict": verdict, "reason": why, **numbers}


def summarize(run_dir: Path, data: Splits, device: torch.device, run_info: dict[str, Any]) -> dict[str, Any]:
    """Score every checkpoint on the test split and write summary.json (run_info is copied in as is)."""
    doc = read_selection(run_dir)
    records: list[Record] = doc["records"]
    scores = []
    for record, rel in zip(records, doc["checkpoints"], strict=True):
        test_loss, test_acc = evaluate(load_model(run_dir / rel, device), data.test, device)
        scores.append(
            {
                "step": record.step,
                "checkpoint": rel,
                "val_loss": record.val_loss,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
            }
        )
    chosen = doc["selection"]["index"]
    finite_val = [i for i, r in enumerate(records) if math.isfinite(r.val_loss)]
    best_val = min(finite_val, key=lambda i: (records[i].val_loss, i))

    model = load_model(run_dir / doc["checkpoints"][chosen], device)
    _, train_acc = evaluate(model, data.train, device)
    _, val_acc = evaluate(model, data.val, device)
    best_test = max(s["test_accuracy"] for s in scores)
    summary = {
        **run_info,
        "baseline_loss": doc["baseline_loss"],
        "selection": doc["selection"],
        "selected": scores[chosen],
        "last": scores[-1],
        "best_val": scores[best_val],
        "best_test_accuracy": best_test,
        "selected_test_accuracy_below_best_points": 100 * (best_test - scores[chosen]["test_accuracy"]),
        "diagnosis": diagnose(train_acc, val_acc, scores[chosen]["test_accuracy"], records),
        "checkpoints": scores,
    }
    write_json(run_dir / "summary.json", summary)
    return summary
