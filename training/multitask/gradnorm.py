"""GradNorm (Chen et al., ICML 2018): task weights w_i learned so that every task trains at a similar pace.

For T tasks with losses L_i and W the weight of the last shared layer:

    G_i = ||grad_W (w_i L_i)|| = w_i ||grad_W L_i||            (w_i > 0)
    r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))               relative inverse training rate
    L_grad = sum_i |G_i - mean(G) r_i^alpha|                   the target mean(G) r_i^alpha held constant

L_grad updates the w_i only (their own optimizer); after each step the weights are renormalised to sum to T.
The norms ||grad_W L_i|| are measured detached, so L_grad is a function of w alone: it cannot leak a gradient
into the shared weights, whose gradient is that of sum_i w_i L_i (the total loss the network trains on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MIN_WEIGHT = 1e-3  # a weight that reached 0 would switch its task off for good (and < 0 would ascend its loss)


def last_shared_weight(model: nn.Module) -> nn.Parameter:
    """W: the weight of the trunk's last convolution, the last layer every head depends on."""
    convs = [m for m in model.trunk.modules() if isinstance(m, nn.Conv2d)]  # type: ignore[union-attr]
    return convs[-1].weight


def task_grad_norms(losses: torch.Tensor, shared: nn.Parameter) -> torch.Tensor:
    """||grad_W L_i|| for each task (T,), detached; the graph is kept for the backward of the total loss."""
    norms = [torch.linalg.vector_norm(torch.autograd.grad(loss, shared, retain_graph=True)[0]) for loss in losses]
    return torch.stack(norms).detach()


def inverse_rates(losses: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)): above 1 for a task that trains slower than the others."""
    ratio = losses / initial  # (T,)
    return ratio / ratio.mean()


def gradnorm_loss(
    weights: torch.Tensor, norms: torch.Tensor, rates: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_grad, G): the loss of the weights and the weighted per-task gradient norms G_i = w_i ||grad_W L_i||."""
    g = weights * norms  # (T,)
    target = (g.mean() * rates**alpha).detach()  # held constant: L_grad must not pull the norms down to it
    return (g - target).abs().sum(), g


class TaskWeights:
    """The w_i of `tasks` tasks and their optimizer; `learn=False` keeps them at 1 (equal weighting)."""

    def __init__(self, tasks: int, alpha: float, lr: float, learn: bool, device: torch.device) -> None:
        self.count = tasks
        self.alpha = alpha
        self.learn = learn
        self.weights = torch.ones(tasks, device=device, requires_grad=learn)
        self.optimizer = torch.optim.Adam([self.weights], lr=lr) if learn else None
        self.initial: torch.Tensor | None = None  # L_i(0): the losses of the first finite iteration

    def values(self) -> torch.Tensor:
        return self.weights.detach()

    def backward(self, losses: torch.Tensor, norms: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Set the weights' gradient from L_grad; returns (L_grad, G, r). `losses` and `norms` are detached."""
        if self.initial is None and bool(torch.isfinite(losses).all()):
            self.initial = losses.clone()
        initial = self.initial if self.initial is not None else losses
        rates = inverse_rates(losses, initial)
        loss, g = gradnorm_loss(self.weights, norms, rates, self.alpha)
        if self.learn:
            (self.weights.grad,) = torch.autograd.grad(loss, self.weights)
        return float(loss.detach()), g.detach(), rates

    def step(self) -> None:
        """One optimizer step of the weights, then renormalise them to sum to the number of tasks."""
        if self.optimizer is None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.weights.clamp_(min=MIN_WEIGHT)
            self.weights.mul_(self.count / self.weights.sum())

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.values().cpu(),
            "initial_losses": None if self.initial is None else self.initial.cpu(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.weights.copy_(state["weights"])
        initial = state["initial_losses"]
        self.initial = None if initial is None else initial.to(self.weights.device)
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
