"""What the training loop carries from one iteration to the next: `TrainState`. last.pt holds all of it but the
window (empty at every checkpoint: one is written right after each Record), so a resumed run carries on exactly."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from training.selection import Record


@dataclass
class Window:
    """Sums over the optimizer steps since the last Record (skipped iterations left out): its mean gradient norm
    and train loss."""

    norm_sum: float = 0.0
    loss_sum: float = 0.0
    steps: int = 0

    def add(self, norm: float, loss: float) -> None:
        self.norm_sum += norm
        self.loss_sum += loss
        self.steps += 1

    def sums(self) -> torch.Tensor:
        """(norm sum, steps, loss sum, steps) in float64: what the ranks all-gather."""
        return torch.tensor([self.norm_sum, self.steps, self.loss_sum, self.steps], dtype=torch.float64)


@dataclass
class TrainState:
    """The loop's own numbers; the parts it trains (model, optimizer, monitor, objective) change in place in `Run`."""

    iteration: int = 0  # iterations run
    step: int = 0  # optimizer steps taken: an iteration with a non-finite loss or gradient norm takes none
    records: list[Record] = field(default_factory=list)  # one per evaluation, what the selection rule reads
    checkpoints: list[str] = field(default_factory=list)  # run-directory paths, parallel to records (rank 0 only)
    baseline_loss: float = math.nan  # the untrained model's validation loss: the selection rule's loss gate
    best_val: float = math.inf  # early stopping: the best validation loss so far, its step, evaluations since
    best_step: int = 0
    evals_since_best: int = 0
    window: Window = field(default_factory=Window)
    started: float = field(default_factory=time.perf_counter)  # a resumed run moves it back by the time already run
    stop_reason: str | None = None  # set by early stopping; None: the run goes on to its last epoch

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started
