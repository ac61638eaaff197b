"""report.png: the gradient norm per iteration (raw and smoothed) and per record, training and validation loss,
the loss gate (loss_ratio x baseline), the norm's peak, the records that met the rule (shaded: selection.json's
`eligible`) and the chosen one. Built from the run's files alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402


def ema(values: list[float], alpha: float = 0.05) -> list[float]:
    out, avg = [], math.nan
    for v in values:
        if math.isfinite(v):
            avg = v if math.isnan(avg) else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def shade_eligible(ax: plt.Axes, steps: list[int], eligible: list[int]) -> None:
    """Shade each record that met the rule over the half-way marks to its neighbours, so that a run of eligible
    records reads as one band and a lone one as a stripe; a chosen checkpoint outside them is a fallback."""
    for n, j in enumerate(eligible):
        left = (steps[j - 1] + steps[j]) / 2 if j > 0 else steps[j]
        right = (steps[j] + steps[j + 1]) / 2 if j + 1 < len(steps) else steps[j]
        label = f"met the rule ({len(eligible)} records)" if n == 0 else None
        ax.axvspan(left, right, color="tab:green", alpha=0.15, linewidth=0, label=label)


def write_report(run_dir: Path, loss_label: str = "cross-entropy") -> Path:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    iters = [m for m in lines if m["kind"] == "iter"]
    doc = json.loads((run_dir / "selection.json").read_text())
    records, selection = doc["records"], doc["selection"]
    steps = [r["step"] for r in records]
    gate = doc["rule"]["loss_ratio"] * doc["baseline_loss"]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    x = [m["step"] for m in iters]
    norms = [m["grad_norm"] for m in iters]
    top.plot(x, norms, color="tab:blue", alpha=0.25, linewidth=0.7, label="grad norm per iteration")
    top.plot(x, ema(norms), color="tab:blue", linewidth=1.5, label="smoothed (EMA 0.05)")
    top.plot(
        steps, [r["grad_norm"] for r in records], "o-", color="tab:orange", markersize=3, label="per record (mean)"
    )
    if selection["peak_index"] is not None:
        p = selection["peak_index"]
        top.plot(steps[p], records[p]["grad_norm"], "^", color="red", markersize=10, label=f"peak (step {steps[p]})")
    top.set_ylabel("global gradient L2 norm")
    top.set_title(f"{run_dir.name}: {'rule satisfied' if selection['rule_satisfied'] else 'fallback'}")

    bottom.plot(x, ema([m["loss"] for m in iters]), color="tab:green", alpha=0.6, label="train loss (EMA)")
    bottom.plot(
        steps, [r["train_loss"] for r in records], "o-", color="tab:green", markersize=3, label="train loss per record"
    )
    bottom.plot(steps, [r["val_loss"] for r in records], "o-", color="tab:purple", markersize=3, label="val loss")
    bottom.axhline(gate, color="gray", linestyle="--", label=f"{doc['rule']['loss_ratio']} x baseline = {gate:.3f}")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel(loss_label)
    for ax in (top, bottom):
        shade_eligible(ax, steps, selection["eligible"])
        ax.axvline(selection["step"], color="black", linestyle=":", label=f"chosen (step {selection['step']})")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
