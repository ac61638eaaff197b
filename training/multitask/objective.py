"""`MultitaskObjective`: what the training loop minimises with a `multitask` section, sum_i w_i L_i over one head
per task, and what that adds to the run.

Per task and per iteration it writes into metrics.jsonl: the loss L_i, the weighted gradient norm G_i on the last
shared layer, the weight w_i and the inverse rate r_i; and per task test metrics into summary.json, with tasks.png.

What the rest of the pipeline sees is the weighted total loss sum_i w_i L_i: the global gradient norm is that
loss's, the Records carry it (val_loss with the weights of that checkpoint), and the selection rule applies to
it. Resume works as for one task (the task weights, their optimizer and L_i(0) are in last.pt); one process
only (the per-task norms would need their own all-reduce) and float32 (GradNorm differentiates through the
gradient norms; TrainConfig refuses `amp` with a multitask section).
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


def weighted(scores: dict[str, dict[str, float]], tasks: list[Task], weights: torch.Tensor) -> float:
    return sum(float(w) * scores[t.name]["loss"] for t, w in zip(tasks, weights, strict=True))


def by_task(tasks: list[Task], values: torch.Tensor) -> dict[str, float]:
    return {t.name: float(v) for t, v in zip(tasks, values, strict=True)}


class MultitaskObjective(Objective):
    """sum_i w_i L_i over the heads of `section.tasks`, the w_i learned by GradNorm (or all 1)."""

    loss_name = "weighted val loss"
    report_label = "weighted total loss"
    supports_ddp = False

    def __init__(self, section: MultitaskSection) -> None:
        self.section = section
        self.tasks = tasks_named(section.tasks)
        self.balancer: TaskWeights | None = None
        self.shared: nn.Parameter | None = None
        self.last: Step | None = None

    def extra_heads(self) -> dict[str, int]:
        return extra_heads(self.tasks)

    def describe(self) -> str:
        return f"multitask {self.section.method} (alpha {self.section.alpha}) over tasks {list(self.section.tasks)}"

    def start(self, model: nn.Module, device: torch.device, data: Splits) -> None:
        s = self.section
        self.balancer = TaskWeights(len(self.tasks), s.alpha, s.weight_lr, learn=s.method == "gradnorm", device=device)
        self.shared = last_shared_weight(model)

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
        assert self.balancer is not None
        scores = evaluate_tasks(model, split, self.tasks, device)
        weights = self.balancer.values()
        return weighted(scores, self.tasks, weights), {
            "val_accuracy": scores["class"]["accuracy"], "tasks": scores, "task_weights": by_task(self.tasks, weights)}

    def evaluation_note(self, fields: dict[str, Any]) -> str:
        return ", weights " + ", ".join(f"{n} {w:.3g}" for n, w in fields["task_weights"].items())

    def data_fields(self) -> dict[str, Any]:
        return {"tasks": describe(self.tasks)}

    def checkpoint_fields(self) -> dict[str, Any]:
        assert self.balancer is not None
        return {"multitask": {"method": self.section.method, "tasks": list(self.section.tasks),
                              **self.balancer.state_dict()}}

    def state_dict(self) -> dict[str, Any]:
        assert self.balancer is not None
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.balancer is not None
        self.balancer.load_state_dict(state)

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
    """Per-task test metrics of the selected and the last checkpoint, and the weights they trained with."""
    test = {}
    for label, rel in (("selected", checkpoints[chosen]), ("last", checkpoints[-1])):
        test[label] = evaluate_tasks(load_model(run_dir / rel, device), data.test, tasks, device)
    final = checkpoint.load(run_dir / checkpoints[-1])["multitask"]
    return {
        "method": section.method,
        "alpha": section.alpha,
        "tasks": describe(tasks),
        "final_weights": by_task(tasks, final["weights"]),
        "initial_losses": None if final["initial_losses"] is None else by_task(tasks, final["initial_losses"]),
        "test": test,
    }
