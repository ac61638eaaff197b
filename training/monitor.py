"""The gradient-norm monitor: one fused global L2 norm per iteration, clipping that reuses it, and flags.

The norm stays a tensor until the loop reads it, once per iteration (the only host sync it adds).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


def grads_of(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """G = sqrt(sum_i g_i^2) over every gradient: per-tensor norms in one fused kernel, then their norm."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def clip_grads_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients so their global norm is at most max_norm, reusing the norm already measured."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


@dataclass(frozen=True)
class Flags:
    finite: bool
    exploding: bool  # norm above explosion_factor x the running median
    vanishing: bool  # norm below the floor


class GradNormMonitor:
    """Watches the per-iteration norm: non-finite counts, running median, explosion and vanishing flags."""

    def __init__(self, explosion_factor: float, vanishing_floor: float, window: int, min_history: int = 10) -> None:
        self.explosion_factor = explosion_factor
        self.vanishing_floor = vanishing_floor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.exploding_total = 0
        self.vanishing_total = 0

    def observe(self, norm: float, loss: float) -> Flags:
        if not (math.isfinite(norm) and math.isfinite(loss)):
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            return Flags(False, False, False)
        self.nonfinite_in_row = 0
        exploding = len(self.history) >= self.min_history and norm > self.explosion_factor * statistics.median(
            self.history
        )
        vanishing = norm < self.vanishing_floor
        self.exploding_total += exploding
        self.vanishing_total += vanishing
        self.history.append(norm)
        return Flags(True, exploding, vanishing)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "exploding_total": self.exploding_total,
            "vanishing_total": self.vanishing_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self.exploding_total = state["exploding_total"]
        self.vanishing_total = state["vanishing_total"]
