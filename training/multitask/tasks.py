"""The tasks a multi-task run learns from the bundled digits, all derived from the images and their labels.

class   the digit, cross-entropy on the main head (served as logits / label / probabilities): ~2.3 at the start
ink     1000 x (the image's mean pixel intensity - 0.3), MSE on a 1-output head (served as "ink"): the target has
        std 34, so its MSE is ~1000 at the start and 20-300 while it trains: 10-500x the cross-entropy, and its
        gradient norm on the last shared layer is ~100x the class task's. That is the imbalance GradNorm is for.
parity  even (0) or odd (1), cross-entropy on a 2-output head (served as "parity"): close to the class task's scale
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Split

INK_SCALE = 1000.0  # per mille of full ink: the regression target's unit
INK_CENTRE = 0.3  # about the digits' mean intensity (0.305): the target is centred so no head bias must travel to 30


@dataclass(frozen=True)
class Task:
    name: str
    output: str  # the key of its head in ConvNet.forward_all
    size: int  # outputs of its extra head; 0 for the main head
    kind: str  # classification | regression
    loss: str  # cross_entropy | mse
    target: str  # what it predicts, for the manifest

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "ink":
            return (x.mean(dim=(1, 2, 3)) - INK_CENTRE) * INK_SCALE  # (B,)
        if self.name == "parity":
            return y % 2  # (B,)
        return y  # (B,)

    def loss_of(self, outputs: dict[str, torch.Tensor], target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        out = outputs[self.output].float()
        if self.kind == "regression":
            return F.mse_loss(out.squeeze(1), target, reduction=reduction)
        return F.cross_entropy(out, target, reduction=reduction)


TASKS = {
    "class": Task("class", "logits", 0, "classification", "cross_entropy", "the digit 0-9"),
    "ink": Task("ink", "ink", 1, "regression", "mse", f"{INK_SCALE:g} x (mean pixel intensity - {INK_CENTRE:g})"),
    "parity": Task("parity", "parity", 2, "classification", "cross_entropy", "0 for an even digit, 1 for odd"),
}


def tasks_named(names: tuple[str, ...]) -> list[Task]:
    return [TASKS[n] for n in names]


def extra_heads(tasks: list[Task]) -> dict[str, int]:
    """ModelConfig.extra_heads: one head per task beside the main (class) head."""
    return {t.output: t.size for t in tasks if t.size}


def describe(tasks: list[Task]) -> list[dict[str, object]]:
    """The tasks as the checkpoint's data entry and the archive manifest list them."""
    served = {"class": ["logits", "label", "probabilities"]}
    return [
        {"name": t.name, "kind": t.kind, "loss": t.loss, "target": t.target, "outputs": served.get(t.name, [t.output])}
        for t in tasks
    ]


def task_losses(tasks: list[Task], outputs: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-task mean losses of one batch, (T,)."""
    return torch.stack([t.loss_of(outputs, t.targets(x, y)) for t in tasks])


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module, split: Split, tasks: list[Task], device: torch.device, batch_size: int = 1024
) -> dict[str, dict[str, float]]:
    """Per task: mean loss, and accuracy (classification) or mean absolute error (regression), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        sums = {t.name: {"loss": 0.0, "hits": 0.0} for t in tasks}
        for start in range(0, len(split), batch_size):
            x = split.x[start : start + batch_size].to(device)  # (B, C, H, W)
            y = split.y[start : start + batch_size].to(device)  # (B,)
            outputs = model.forward_all(x)  # type: ignore[operator]
            for t in tasks:
                target = t.targets(x, y)
                sums[t.name]["loss"] += t.loss_of(outputs, target, reduction="sum").item()
                out = outputs[t.output].float()
                if t.kind == "regression":
                    sums[t.name]["hits"] += (out.squeeze(1) - target).abs().sum().item()
                else:
                    sums[t.name]["hits"] += (out.argmax(dim=1) == target).sum().item()
        n = len(split)
        metric = {t.name: "mae" if t.kind == "regression" else "accuracy" for t in tasks}
        return {t.name: {"loss": sums[t.name]["loss"] / n, metric[t.name]: sums[t.name]["hits"] / n} for t in tasks}
    finally:
        model.train(was_training)
