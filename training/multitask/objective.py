"""`MultitaskObjective`: what the training loop minimises with a `multitask` section, sum_i w_i L_i over one head
per task, and what that adds to the run.

Per task and per iteration it writes into metrics.jsonl: the loss L_i, the weighted gradient norm G_i on the last
shared layer, the weight w_i and the inverse rate r_i; and per task test metrics into summary.json, with tasks.png.

The network trains on the weighted total loss sum_i w_i L_i, and the global gradient norm is that loss's. What
the Records carry as val_loss, and so what early stopping, the loss gate and the rule's "best" compare, is a
choice made here (`scoring`):

- "normalized" (the default): mean_i L_i / L_i(0), each task's validation loss over that task's validation loss
  of the untrained model (measured in `start`, before the first update: the evaluation the baseline is). Its
  weights never move, so every checkpoint is scored on one scale; each task counts by its relative progress,
  the quantity GradNorm itself balances (its rates r_i), so a task whose loss is 450x larger does not drown
  the other; and it exists from the first evaluation on, where final weights would only be known at the end.
  The baseline is 1 by construction: the loss gate reads "the tasks' losses fell to 95% of their start, on
  average".
- "weighted": sum_i w_i L_i with the weights of that checkpoint (what runs before this change recorded). Under
  GradNorm the w_i move by 100x during a run, so two checkpoints' values are on different scales: the demo's
  rule kept step 880 at 5.42 over step 1200 at 1.10 on numbers that cannot be compared.

Every evaluation line of metrics.jsonl carries both (normalized_val_loss, weighted_val_loss) and the per-task
losses, and summary.json every checkpoint's per-task test metrics, so `gradserve study` rescores a run either
way without retraining. Resume works as for one task (the task weights, their optimizer, L_i(0) and the
scoring with its L_i(0) are in last.pt; a run from before the scoring existed carries on "weighted", as its
records are); one process only (the per-task norms would need their own all-reduce) and float32 (GradNorm
differentiates through the gradient norms; TrainConfig refuses `amp` with a multitask section).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training import checkpoint
from training.config import MultitaskSection
from training.data import Split, Splits
from training.multitask.gradnorm import TaskWeights, last_shared_weight, task_grad_norms
from training.multitask.report import write_task_report
from training.multitask.tasks import Task, describe, evaluate_tasks, extra_heads, task_losses, tasks_named
from training.objective import Objective
from training.summary import load_model, write_json


@dataclass(frozen=True)
class Step:
    """What one forward/backward computed; the model's .grad holds the gradient of `loss` alone."""

    loss: torch.Tensor  # sum_i w_i L_i, the loss the network trains on
    losses: torch.Tensor  # (T,) L_i
    norms: torch.Tensor  # (T,) G_i = w_i ||grad_W L_i||
    rates: torch.Tensor  # (T,) r_i
    weights: torch.Tensor  # (T,) the w_i this step used
    grad_loss: float  # L_grad


def forward_backward(
    model: nn.Module, tasks: list[Task], balancer: TaskWeights, shared: nn.Parameter, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """forward -> per-task losses -> their gradient norms on W -> backward of sum_i w_i L_i -> the weights' gradient."""
    outputs = model.forward_all(x)  # type: ignore[operator]  # {"logits": (B, K), <head>: (B, k)}
    losses = task_losses(tasks, outputs, x, y)  # (T,)
    norms = task_grad_norms(losses, shared)  # (T,) ||grad_W L_i||, detached
    weights = balancer.values()
    loss = (weights * losses).sum()  # the weights enter as constants: only L_grad moves them
    loss.backward()
    grad_loss, g, rates = balancer.backward(losses.detach(), norms)
    return Step(loss.detach(), losses.detach(), g, rates, weights.clone(), grad_loss)


SCORINGS = ("normalized", "weighted")  # what a multi-task Record's val_loss is (the module's docstring)


def weighted(scores: dict[str, dict[str, float]], tasks: list[Task], weights: torch.Tensor) -> float:
    """sum_i w_i L_i: the loss the network trains on, with this moment's weights."""
    return sum(float(w) * scores[t.name]["loss"] for t, w in zip(tasks, weights, strict=True))


def normalized(scores: dict[str, dict[str, float]], initial: dict[str, float]) -> float:
    """mean_i L_i / L_i(0): each task's loss relative to the untrained model's, equally weighted, fixed scale."""
    return sum(scores[name]["loss"] / start for name, start in initial.items()) / len(initial)


def by_task(tasks: list[Task], values: torch.Tensor) -> dict[str, float]:
    return {t.name: float(v) for t, v in zip(tasks, values, strict=True)}


class MultitaskObjective(Objective):
    """sum_i w_i L_i over the heads of `section.tasks`, the w_i learned by GradNorm (or all 1); the Records score
    checkpoints by `scoring` (the module's docstring: "normalized" unless told otherwise)."""

    supports_ddp = False

    def __init__(self, section: MultitaskSection, scoring: str = "normalized") -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.section = section
        self.scoring = scoring
        self.tasks = tasks_named(section.tasks)
        self.balancer: TaskWeights | None = None
        self.shared: nn.Parameter | None = None
        self.last: Step | None = None
        self.initial_val: dict[str, float] | None = None  # L_i(0) on the validation split, the untrained model's

    @property
    def loss_name(self) -> str:  # type: ignore[override]
        return "normalized val loss" if self.scoring == "normalized" else "weighted val loss"

    @property
    def report_label(self) -> str:  # type: ignore[override]
        return "mean of L_i / L_i(0), validation" if self.scoring == "normalized" else "weighted total loss"

    def extra_heads(self) -> dict[str, int]:
        return extra_heads(self.tasks)

    def describe(self) -> str:
        return f"multitask {self.section.method} (alpha {self.section.alpha}) over tasks {list(self.section.tasks)}"

    def start(self, model: nn.Module, device: torch.device, data: Splits) -> None:
        s = self.section
        self.balancer = TaskWeights(len(self.tasks), s.alpha, s.weight_lr, learn=s.method == "gradnorm", device=device)
        self.shared = last_shared_weight(model)
        # L_i(0): the untrained model, in eval mode (BatchNorm's running stats untouched), before any update.
        # A resumed run replaces them with the ones its first start measured (load_state_dict).
        scores = evaluate_tasks(model, data.val, self.tasks, device)
        self.initial_val = {t.name: scores[t.name]["loss"] for t in self.tasks}

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, use_amp: bool) -> torch.Tensor:
        assert self.balancer is not None and self.shared is not None
        optimizer.zero_grad(set_to_none=True)
        self.last = forward_backward(model, self.tasks, self.balancer, self.shared, x, y)
        return self.last.loss

    def stepped(self) -> None:
        assert self.balancer is not None
        self.balancer.step()  # w_i by L_grad, then renormalised to sum to T

    def iteration_fields(self) -> dict[str, Any]:
        assert self.last is not None
        s, tasks = self.last, self.tasks
        return {"task_losses": by_task(tasks, s.losses), "task_grad_norms": by_task(tasks, s.norms),
                "task_weights": by_task(tasks, s.weights), "inverse_rates": by_task(tasks, s.rates),
                "grad_loss": s.grad_loss}

    def evaluate(self, model: nn.Module, split: Split, device: torch.device) -> tuple[float, dict[str, Any]]:
        assert self.balancer is not None and self.initial_val is not None
        scores = evaluate_tasks(model, split, self.tasks, device)
        weights = self.balancer.values()
        both = {"normalized": normalized(scores, self.initial_val), "weighted": weighted(scores, self.tasks, weights)}
        return both[self.scoring], {
            "val_accuracy": scores["class"]["accuracy"], "tasks": scores, "task_weights": by_task(self.tasks, weights),
            "normalized_val_loss": both["normalized"], "weighted_val_loss": both["weighted"]}

    def evaluation_note(self, fields: dict[str, Any]) -> str:
        return ", weights " + ", ".join(f"{n} {w:.3g}" for n, w in fields["task_weights"].items())

    def data_fields(self) -> dict[str, Any]:
        return {"tasks": describe(self.tasks)}

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"multitask": {"method": self.section.method, "tasks": list(self.section.tasks), **self.state_dict()}}

    def state_dict(self) -> dict[str, Any]:
        assert self.balancer is not None
        return {**self.balancer.state_dict(), "scoring": self.scoring, "initial_val_losses": self.initial_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.balancer is not None
        self.balancer.load_state_dict(state)
        # A run from before the scoring existed recorded the weighted loss: carry on scoring it that way.
        self.scoring = state.get("scoring", "weighted")
        self.initial_val = state.get("initial_val_losses") or self.initial_val

    def finish(self, run_dir: Path, summary: dict[str, Any], data: Splits, checkpoints: list[str], chosen: int,
               device: torch.device) -> str:
        summary["multitask"] = task_summary(run_dir, self.section, data, self.tasks, checkpoints, chosen, device)
        write_json(run_dir / "summary.json", summary)
        write_task_report(run_dir)
        return f"test metrics of the selected checkpoint: {summary['multitask']['test']['selected']}"


def task_summary(
    run_dir: Path, section: MultitaskSection, data: Splits, tasks: list[Task], checkpoints: list[str], chosen: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-task test metrics of the selected and the last checkpoint, the weights they trained with, the scoring
    and its L_i(0), and every checkpoint's per-task test metrics (`gradserve study` rescores from them)."""
    every = [evaluate_tasks(load_model(run_dir / rel, device), data.test, tasks, device) for rel in checkpoints]
    final = checkpoint.load(run_dir / checkpoints[-1])["multitask"]
    return {
        "method": section.method,
        "alpha": section.alpha,
        "tasks": describe(tasks),
        "final_weights": by_task(tasks, final["weights"]),
        "initial_losses": None if final["initial_losses"] is None else by_task(tasks, final["initial_losses"]),
        "scoring": final.get("scoring", "weighted"),
        "initial_val_losses": final.get("initial_val_losses"),
        "test": {"selected": every[chosen], "last": every[-1]},
        "checkpoints": [{"checkpoint": rel, **scores} for rel, scores in zip(checkpoints, every, strict=True)],
    }
