"""study.png: the gap to the oracle per strategy, one point per seed and variant; and one seed's gradient-norm
curve with every strategy's choice marked (one panel per scoring). suite.png: the gap panels of every study."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402

from training.study.strategies import LABELS, STRATEGIES  # noqa: E402

VARIANT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
STRATEGY_STYLE = {"rule": ("tab:red", "o"), "rule-grid": ("tab:purple", "D"), "best-val": ("tab:green", "s"),
                  "last": ("tab:gray", "v"), "oracle": ("black", "*")}
SHORT = {"rule": "rule", "rule-grid": "rule\n(grid, val)", "best-val": "best val", "last": "last",
         "oracle": "oracle\n(hindsight)"}


def gap_panel(ax: plt.Axes, doc: dict[str, Any], title: str) -> None:
    """Gap to the oracle in the primary metric, strategies along x, a point per seed, a colour per variant."""
    primary = doc["metrics"][0]
    variants = doc["variants"]
    width = 0.7 / len(variants)
    for v_index, (variant, colour) in enumerate(zip(variants, VARIANT_COLOURS, strict=False)):
        for s_index, s in enumerate(STRATEGIES):
            gaps = [run["strategies"][s]["gap"][primary["name"]] for run in variant["runs"]]
            x0 = s_index - 0.35 + width * (v_index + 0.5)
            ax.scatter(side_by_side(gaps, x0, width * 0.9), gaps, s=10, color=colour, alpha=0.8,
                       label=variant_name(variant, len(variants) > 2) if s_index == 0 else None)
            finite = [g for g in gaps if g is not None and math.isfinite(g)]
            if finite:
                ax.plot([x0 - width * 0.4, x0 + width * 0.4], [sum(finite) / len(finite)] * 2, color=colour)
    worth = doc["one_example"].get(primary["name"])
    if worth:
        ax.axhline(worth, color="gray", linestyle=":", linewidth=1, label=f"one test example ({worth:.2f})")
    ax.set_xticks(range(len(STRATEGIES)), [SHORT[s] for s in STRATEGIES], fontsize=8)
    ax.set_ylabel(f"gap to oracle, {primary['label']} ({primary['unit']})")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.7)


def side_by_side(values: list[float | None], centre: float, width: float) -> list[float]:
    """x positions that put seeds with the same value next to each other (accuracy gaps come in whole examples,
    so many coincide): a row of n equal values reads as n points."""
    counts = Counter(values)
    step = width / max(max(counts.values()), 1)
    seen: dict[float | None, int] = {}
    xs = []
    for v in values:
        k = seen.get(v, 0)
        seen[v] = k + 1
        xs.append(centre + (k - (counts[v] - 1) / 2) * step)
    return xs


def variant_name(variant: dict[str, Any], with_scoring: bool) -> str:
    stopping = f"early stopping (patience {variant['patience']})" if variant["patience"] else "no early stopping"
    return f"{stopping}, {variant['scoring']}" if with_scoring else stopping


def curve_panel(ax: plt.Axes, doc: dict[str, Any], scoring: str) -> None:
    """One seed: the gradient norm per record, the validation loss (right axis), and below them a row per
    strategy marking where it chose: filled with early stopping off, hollow with it on (the dashed line is where
    it stopped). Rows, not markers on the curve: strategies that agree would hide each other."""
    c = doc["curve"]
    steps, norms = c["step"], [math.nan if g is None else g for g in c["grad_norm"]]
    ax.plot(steps, norms, "-", color="tab:blue", linewidth=1.2, label="gradient norm per record")
    finite = [g for g in norms if math.isfinite(g)] or [0.0, 1.0]
    low, high = min(finite), max(finite)
    ax.set_ylim(low - 0.6 * (high - low or 1), high + 0.05 * (high - low or 1))  # the bottom third holds the rows
    twin = ax.twinx()
    twin.plot(steps, c["val_loss"][scoring], "-", color="tab:brown", alpha=0.5, linewidth=1, label="val loss")
    twin.set_yscale("log")
    twin.set_ylabel(f"validation loss ({scoring})", color="tab:brown", fontsize=8)
    rows = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    span = (steps[-1] - steps[0]) or 1
    ax.set_xlim(steps[0] - 0.3 * span, steps[-1] + 0.03 * span)  # room on the left for the rows' names
    for k, s in enumerate(STRATEGIES):
        ax.text(steps[0] - 0.29 * span, 0.04 + 0.055 * k, LABELS[s], transform=rows, fontsize=7, va="center")
    for variant in (v for v in doc["variants"] if v["scoring"] == scoring):
        chosen, hollow = c["chosen"][variant["key"]], bool(variant["patience"])
        if hollow and chosen["last_step"] != steps[-1]:
            ax.axvline(chosen["last_step"], color="gray", linestyle="--", linewidth=1,
                       label=f"early stopping stops (patience {variant['patience']})")
        for k, s in enumerate(STRATEGIES):
            colour, marker = STRATEGY_STYLE[s]
            ax.plot(chosen[s], 0.04 + 0.055 * k, marker, transform=rows, markersize=10 if hollow else 6,
                    markerfacecolor="none" if hollow else colour, markeredgecolor=colour, linestyle="none")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global gradient norm (mean per record)")
    ax.set_title(f"seed {c['seed']}: where each strategy chose (filled: early stopping off, hollow: on)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def write_study_plot(doc: dict[str, Any], path: Path) -> Path:
    scorings = list(dict.fromkeys(v["scoring"] for v in doc["variants"]))
    fig, axes = plt.subplots(1, 1 + len(scorings), figsize=(6.5 * (1 + len(scorings)), 5.5))
    gap_panel(axes[0], doc, f"{doc['label']}: {len(doc['seeds'])} seeds, test n = {doc['n_test']}")
    for ax, scoring in zip(axes[1:], scorings, strict=True):
        curve_panel(ax, doc, scoring)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_suite_plot(docs: list[dict[str, Any]], path: Path) -> Path:
    columns = min(4, len(docs))
    rows = math.ceil(len(docs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)
    for ax, doc in zip(axes.flat, docs, strict=False):
        gap_panel(ax, doc, f"{doc['label']} (test n = {doc['n_test']})")
    for ax in list(axes.flat)[len(docs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
