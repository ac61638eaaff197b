"""What the training loop minimises, and what that adds to the run: `Objective` is the single-task one
(cross-entropy of the class head); training/multitask/objective.py's `MultitaskObjective` balances one loss per
head. `train(cfg, objective=...)` takes either; without one it uses the config's (training/train.py, objective_for).

The loop (training/train.py) owns everything else, whatever the objective: data, devices, DDP, AMP, the
global gradient norm, clipping, skipped steps, the schedule, evaluation bookkeeping, checkpoints, resume,
early stopping and selection. It calls, in this order: `extra_heads` (building the model), `start`, `describe`,
then `evaluate` (the baseline) or, resuming, `load_state_dict`; per iteration `backward` -> `stepped` (when the
optimizer stepped) -> `iteration_fields`; per evaluation `evaluate`, then `data_fields`, `checkpoint_fields` and
`state_dict` for the checkpoint (training/checkpoint.py); and `finish` at the end.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Split, Splits
from training.evaluate import evaluate, evaluate_regression


class Objective:
    """Cross-entropy of the class head."""

    loss_name = "val loss"  # in messages: what the loss the selection rule sees is
    report_label = "cross-entropy"  # the report's loss axis
    supports_ddp = True

    def extra_heads(self) -> dict[str, int]:
        """Heads beside the class head the model needs: name -> width."""
        return {}

    def describe(self) -> str:
        """One line for the start of the run ("" for nothing)."""
        return ""

    def start(self, model: nn.Module, device: torch.device, data: Splits) -> None:
        """The model is built and on its device; `data` is what it trains on."""

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, use_amp: bool) -> torch.Tensor:
        """forward -> loss -> backward into the model's (zeroed) .grad, unscaled; returns the loss, detached."""
        with torch.autocast(x.device.type, dtype=torch.float16) if use_amp else contextlib.nullcontext():
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # measure the true gradients, not the scaled ones
        else:
            loss.backward()
        return loss.detach()

    def stepped(self) -> None:
        """The optimizer took the step (it does not when the loss or the gradient norm is not finite)."""

    def iteration_fields(self) -> dict[str, Any]:
        """Extra fields of this iteration's metrics line."""
        return {}

    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> tuple[float, dict[str, Any]]:
        """(the loss the selection rule sees, extra fields of the evaluation's metrics line)."""
        loss, accuracy = evaluate(model, split, device)
        return loss, {"val_accuracy": accuracy}

    def evaluation_note(self, fields: dict[str, Any]) -> str:
        """What an evaluation line adds to the loss, for people."""
        return f" acc {fields['val_accuracy']:.3f}"

    def data_fields(self) -> dict[str, Any]:
        """Extra fields of the checkpoints' data description."""
        return {}

    def checkpoint_fields(self) -> dict[str, Any]:
        """Extra top-level fields of every checkpoint."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to carry on exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self, run_dir: Path, summary: dict[str, Any], data: Splits, checkpoints: list[str], chosen: int,
               device: torch.device) -> str:
        """Extra artifacts once the run is summarised (summary.json is written: `summary` is what it holds);
        returns a closing line."""
        selected = summary["selected"]
        return (f"selected checkpoint {selected['checkpoint']}: test accuracy {selected['test_accuracy']:.4f} "
                f"(best of all checkpoints {summary['best_test_accuracy']:.4f}); {summary['diagnosis']['verdict']}")



class RegressionObjective(Objective):
    """Mean squared error of the standardised targets (every target weighs alike whatever its units); evaluations
    also report MAE and R² in the targets' own units."""

    report_label = "MSE (standardised targets)"

    def __init__(self) -> None:
        self.data: Splits | None = None

    def start(self, model: nn.Module, device: torch.device, data: Splits) -> None:
        self.data = data

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, use_amp: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.float16) if use_amp else contextlib.nullcontext():
            loss = F.mse_loss(model(x).float(), y)  # (B, T) against (B, T)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        return loss.detach()

    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> tuple[float, dict[str, Any]]:
        assert self.data is not None and self.data.preprocess is not None
        loss, scores = evaluate_regression(model, split, device, self.data.preprocess)
        return loss, {"val_mae": scores["mae"], "val_r2": scores["r2"]}

    def evaluation_note(self, fields: dict[str, Any]) -> str:
        return f" MAE {fields['val_mae']:.4g} R² {fields['val_r2']:.3f}"

    def finish(self, run_dir: Path, summary: dict[str, Any], data: Splits, checkpoints: list[str], chosen: int,
               device: torch.device) -> str:
        selected = summary["selected"]
        return (f"selected checkpoint {selected['checkpoint']}: test MAE {selected['test_mae']:.4g}, R² "
                f"{selected['test_r2']:.3f} (best R² of all checkpoints {summary['best_test_r2']:.3f}); "
                f"{summary['diagnosis']['verdict']}")
