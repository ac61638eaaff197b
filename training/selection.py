"""The gradient-norm checkpoint rule of SELECTION.md: a pure function over evaluation records.

No torch here: `gradserve select` and the tests use it without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

STRATEGIES = ("best", "first")


@dataclass(frozen=True)
class Record:
    step: int  # optimizer steps done when this checkpoint was saved
    grad_norm: float  # mean of the per-iteration global gradient norms since the previous record
    train_loss: float  # mean training loss over the same iterations
    val_loss: float  # validation loss of this checkpoint (eval mode)


@dataclass(frozen=True)
class SelectionRule:
    decline_window: int = 3  # k: consecutive transitions that must not rise
    tolerance: float = 0.03  # tau: allowed relative rise per transition ("fluctuation < 3%")
    loss_ratio: float = 0.95  # rho: val_loss must be <= rho * baseline_loss
    strategy: str = "best"  # "best" or "first"


@dataclass(frozen=True)
class Selection:
    index: int  # position in records of the chosen checkpoint
    step: int  # its step
    rule_satisfied: bool  # False when the fallback chose it
    reason: str  # one human sentence: why this checkpoint
    peak_index: int | None  # p, or None when no grad_norm is finite
    eligible: tuple[int, ...]  # indices that met the rule, ascending


def validate(records: Sequence[Record], baseline_loss: float, rule: SelectionRule) -> None:
    """Raise ValueError naming the first thing wrong with the inputs."""
    if not records:
        raise ValueError("no records: train with at least one evaluation before selecting a checkpoint")
    if not (math.isfinite(baseline_loss) and baseline_loss > 0):
        raise ValueError(f"baseline_loss must be finite and > 0, got {baseline_loss!r}")
    if not any(math.isfinite(r.val_loss) for r in records):
        raise ValueError("no record has a finite val_loss; every evaluation diverged")
    if rule.decline_window < 1:
        raise ValueError(f"decline_window must be >= 1, got {rule.decline_window}")
    if rule.tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {rule.tolerance}")
    if not 0 < rule.loss_ratio <= 1:
        raise ValueError(f"loss_ratio must be in (0, 1], got {rule.loss_ratio}")
    if rule.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {rule.strategy!r}")
    for prev, cur in zip(records, records[1:], strict=False):
        if cur.step <= prev.step:
            raise ValueError(f"record steps must be strictly increasing, got {prev.step} then {cur.step}")


def peak_index(grad_norms: Sequence[float]) -> int | None:
    """Index of the largest finite norm, the earliest on ties; None when none is finite."""
    finite = [(g, i) for i, g in enumerate(grad_norms) if math.isfinite(g)]
    return max(finite, key=lambda gi: (gi[0], -gi[1]))[1] if finite else None


def is_settled(g: Sequence[float], j: int, peak: int, k: int, tau: float) -> bool:
    """Clause 2: the k transitions ending at j come after the peak, never rise by more than tau, and fall overall."""
    if j - k < peak or not all(math.isfinite(x) for x in g[j - k : j + 1]):
        return False
    never_rose = all(g[i] <= g[i - 1] * (1 + tau) for i in range(j - k + 1, j + 1))
    return never_rose and g[j] < g[j - k]


def select_checkpoint(
    records: Sequence[Record], baseline_loss: float, rule: SelectionRule = SelectionRule()
) -> Selection:
    validate(records, baseline_loss, rule)
    g = [r.grad_norm for r in records]
    v = [r.val_loss for r in records]
    gate = rule.loss_ratio * baseline_loss

    p = peak_index(g)
    settled = (
        []
        if p is None
        else [j for j in range(len(records)) if is_settled(g, j, p, rule.decline_window, rule.tolerance)]
    )
    passes_gate = [j for j in range(len(records)) if math.isfinite(v[j]) and v[j] <= gate]
    eligible = tuple(j for j in settled if j in set(passes_gate))

    if eligible:
        if rule.strategy == "best":
            chosen = min(eligible, key=lambda j: (v[j], j))
            how = "the lowest validation loss among"
        else:
            chosen = eligible[0]
            how = "the earliest of"
        reason = (
            f"step {records[chosen].step} is {how} {len(eligible)} checkpoint(s) where the gradient norm settled "
            f"into a decline after its peak at step {records[p].step} (window {rule.decline_window}, tolerance "
            f"{rule.tolerance:g}) and val_loss {v[chosen]:.4g} <= {rule.loss_ratio:g} x baseline {baseline_loss:.4g}"
        )
        return Selection(chosen, records[chosen].step, True, reason, p, eligible)

    chosen = min((j for j in range(len(records)) if math.isfinite(v[j])), key=lambda j: (v[j], j))
    failed = []
    if not settled:
        failed.append("no settled decline of the gradient norm after its peak")
    if not passes_gate:
        failed.append(f"no val_loss <= {rule.loss_ratio:g} x baseline {baseline_loss:.4g} (the loss gate)")
    if settled and passes_gate:
        failed.append("no checkpoint met both the settled decline and the loss gate")
    reason = (
        f"fallback: {' and '.join(failed)}; chose step {records[chosen].step}, the lowest finite val_loss "
        f"{v[chosen]:.4g}"
    )
    return Selection(chosen, records[chosen].step, False, reason, p, ())
