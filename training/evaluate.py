"""How well a model does on a split, in eval mode under no_grad (BatchNorm running stats stay put):
cross-entropy and accuracy for classification; for regression the MSE of the standardised targets (the loss
the run minimises) and MSE, MAE and R² in the targets' own units."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from handlers.preprocess import Preprocess
from training.data import Split, Splits


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy). The model is put in eval mode and handed back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(split), batch_size):
            x = split.x[start : start + batch_size].to(device)  # (B, C, H, W)
            y = split.y[start : start + batch_size].to(device)  # (B,)
            logits = model(x).float()  # (B, K)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
        return loss_sum / len(split), correct / len(split)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_regression(model: nn.Module, split: Split, device: torch.device, preprocess: Preprocess,
                        batch_size: int = 1024) -> tuple[float, dict[str, float]]:
    """(MSE of the standardised targets, {"mse", "mae", "r2"} in the targets' own units, over every target)."""
    was_training = model.training
    model.eval()
    try:
        outs, ys = [], []
        for start in range(0, len(split), batch_size):
            outs.append(model(split.x[start : start + batch_size].to(device)).float().cpu())  # (B, T)
            ys.append(split.y[start : start + batch_size])  # (B, T), standardised
        out, y = torch.cat(outs), torch.cat(ys)
    finally:
        model.train(was_training)
    loss = float(F.mse_loss(out, y))
    pred, truth = preprocess.unstandardize_target(out.double()), preprocess.unstandardize_target(y.double())
    residual = float(((pred - truth) ** 2).sum())
    spread = float(((truth - truth.mean(dim=0)) ** 2).sum())
    return loss, {"mse": residual / truth.numel(), "mae": float((pred - truth).abs().mean()),
                  "r2": 1 - residual / spread if spread > 0 else float("nan")}


def score(model: nn.Module, split: Split, device: torch.device, data: Splits) -> dict[str, float]:
    """The split's scores for the run's task: {"loss", "accuracy"} or {"loss", "mse", "mae", "r2"}."""
    if data.task == "regression":
        assert data.preprocess is not None
        loss, scores = evaluate_regression(model, split, device, data.preprocess)
        return {"loss": loss, **scores}
    loss, accuracy = evaluate(model, split, device)
    return {"loss": loss, "accuracy": accuracy}
