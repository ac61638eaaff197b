"""Loss and accuracy of a model on a split, in eval mode under no_grad (BatchNorm running stats stay put)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Split


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
