"""SELECTION.md, clause by clause and error by error, as tables of (records, baseline, rule) -> expected choice."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from training.selection import Record, Selection, SelectionRule, select_checkpoint

NAN, INF = math.nan, math.inf
BASE = 2.3  # baseline loss; the default gate is 0.95 * 2.3 = 2.185


def recs(norms: list[float], vals: list[float] | None = None, steps: list[int] | None = None) -> list[Record]:
    vals = vals or [1.0] * len(norms)
    steps = steps or [10 * (i + 1) for i in range(len(norms))]
    return [Record(step=s, grad_norm=g, train_loss=1.0, val_loss=v) for s, g, v in zip(steps, norms, vals, strict=True)]


# (id, norms, val losses, rule, expected index, rule_satisfied, peak, eligible)
CASES = [
    # 1. Peak: the largest finite norm, earliest on ties; non-finite norms never peak.
    ("peak-then-decline", [1, 3, 2.9, 2.8, 2.7], None, SelectionRule(), 4, True, 1, (4,)),
    ("peak-earliest-on-tie", [3, 3, 2.9, 2.8, 2.7], None, SelectionRule(), 3, True, 0, (3, 4)),
    ("nan-norm-is-not-the-peak", [1, NAN, 3, 2.9, 2.8, 2.7], None, SelectionRule(), 5, True, 2, (5,)),
    ("inf-norm-is-not-the-peak", [INF, 3, 2.9, 2.8, 2.7], None, SelectionRule(), 4, True, 1, (4,)),
    ("no-finite-norm", [NAN, NAN, NAN, NAN], [1.0, 0.5, 0.7, 0.9], SelectionRule(), 1, False, None, ()),
    # 2. Settled decline: j - k >= p (window after the peak, including the peak itself).
    ("window-too-short-after-peak", [1, 3, 2.9, 2.8], None, SelectionRule(), 0, False, 1, ()),
    ("window-of-one", [1, 3, 2.9], None, SelectionRule(decline_window=1), 2, True, 1, (2,)),
    ("window-can-start-at-peak", [3, 2, 1, 0.5], None, SelectionRule(), 3, True, 0, (3,)),
    # 2. ...every g in the window finite.
    ("nan-inside-window", [3, 2.9, NAN, 2.7, 2.6], None, SelectionRule(), 0, False, 0, ()),
    ("nan-before-window-is-fine", [3, NAN, 2.9, 2.8, 2.7, 2.6], None, SelectionRule(), 5, True, 0, (5,)),
    # 2. ...never rose by more than tau per transition (a rise within tau is allowed).
    ("rise-within-tolerance", [3, 2.9, 2.95, 2.8], None, SelectionRule(), 3, True, 0, (3,)),
    ("rise-above-tolerance", [3, 2.5, 2.6, 2.4], None, SelectionRule(), 0, False, 0, ()),
    ("rise-exactly-tolerance", [3.0, 2.0, 2.06, 1.9], None, SelectionRule(), 3, True, 0, (3,)),
    ("zero-tolerance-flat-fails", [3, 2, 2.0001, 1.9], None, SelectionRule(tolerance=0.0), 0, False, 0, ()),
    # 2. ...and fell overall across the window (flat within tolerance is not a decline).
    ("flat-is-not-a-decline", [3, 3, 3, 3], None, SelectionRule(), 0, False, 0, ()),
    ("overall-fall-required", [3, 2.9, 2.95, 3.0, 2.99], None, SelectionRule(), 0, False, 0, ()),
    # 3. Loss gate: v[j] finite and <= rho * baseline (the boundary itself passes).
    ("gate-fails", [3, 2.9, 2.8, 2.7], [2.3, 2.3, 2.3, 2.2], SelectionRule(), 3, False, 0, ()),
    ("gate-boundary-passes", [3, 2.9, 2.8, 2.7], [2.3, 2.3, 2.3, 0.95 * BASE], SelectionRule(), 3, True, 0, (3,)),
    ("gate-nan-val", [3, 2.9, 2.8, 2.7, 2.6], [2.0, 1.0, 1.0, NAN, 1.5], SelectionRule(), 4, True, 0, (4,)),
    ("gate-ratio-one", [3, 2.9, 2.8, 2.7], [2.3, 2.3, 2.3, 2.25], SelectionRule(loss_ratio=1.0), 3, True, 0, (3,)),
    # 5. Choice: "best" = lowest v among eligible (earliest on ties), "first" = earliest eligible.
    ("best-lowest-val", [3, 2.9, 2.8, 2.7, 2.6, 2.5], [2, 2, 2, 0.5, 0.3, 0.4], SelectionRule(), 4, True, 0, (3, 4, 5)),
    (
        "best-earliest-on-tie",
        [3, 2.9, 2.8, 2.7, 2.6, 2.5],
        [2, 2, 2, 0.3, 0.3, 0.4],
        SelectionRule(),
        3,
        True,
        0,
        (3, 4, 5),
    ),
    (
        "first-earliest",
        [3, 2.9, 2.8, 2.7, 2.6, 2.5],
        [2, 2, 2, 0.5, 0.3, 0.4],
        SelectionRule(strategy="first"),
        3,
        True,
        0,
        (3, 4, 5),
    ),
    ("best-ignores-ineligible-lower-val", [3, 2.9, 2.8, 2.7], [2, 0.1, 2, 1.0], SelectionRule(), 3, True, 0, (3,)),
    # 6. Fallback: lowest finite v (earliest on ties), rule_satisfied False.
    ("fallback-lowest-val", [1, 2, 3], [1.0, 0.5, 0.7], SelectionRule(), 1, False, 2, ()),
    ("fallback-earliest-on-tie", [1, 2, 3], [0.5, 0.5, 0.7], SelectionRule(), 0, False, 2, ()),
    ("fallback-skips-nan-val", [1, 2, 3], [NAN, 0.9, 0.7], SelectionRule(), 2, False, 2, ()),
]


@pytest.mark.parametrize(
    ("norms", "vals", "rule", "index", "satisfied", "peak", "eligible"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_rule(norms, vals, rule, index, satisfied, peak, eligible) -> None:
    records = recs(norms, vals)
    got = select_checkpoint(records, BASE, rule)
    assert isinstance(got, Selection)
    assert (got.index, got.step, got.rule_satisfied, got.peak_index, got.eligible) == (
        index, records[index].step, satisfied, peak, eligible,
    )  # fmt: skip
    assert got.reason


# Fallback reasons name what failed: the decline, the loss gate, or both.
@pytest.mark.parametrize(
    ("norms", "vals", "must_mention", "must_not_mention"),
    [
        ([1, 2, 3], [1.0, 0.9, 0.8], ["no settled decline"], ["loss gate"]),
        ([3, 2.9, 2.8, 2.7], [2.3, 2.3, 2.3, 2.3], ["loss gate"], ["no settled decline"]),
        ([1, 2, 3], [2.3, 2.3, 2.3], ["no settled decline", "loss gate"], []),
        ([3, 2.9, 2.8, 2.7], [1.0, 1.0, 1.0, 2.3], ["both"], []),  # each holds somewhere, never together
    ],
    ids=["decline", "gate", "decline-and-gate", "never-together"],
)
def test_fallback_reason(norms, vals, must_mention, must_not_mention) -> None:
    got = select_checkpoint(recs(norms, vals), BASE)
    assert not got.rule_satisfied
    assert got.reason.startswith("fallback")
    for text in must_mention:
        assert text in got.reason
    for text in must_not_mention:
        assert text not in got.reason


ERRORS = [
    ("no-records", [], BASE, SelectionRule(), "no records"),
    ("baseline-nan", recs([1.0]), NAN, SelectionRule(), "baseline_loss"),
    ("baseline-inf", recs([1.0]), INF, SelectionRule(), "baseline_loss"),
    ("baseline-zero", recs([1.0]), 0.0, SelectionRule(), "baseline_loss"),
    ("baseline-negative", recs([1.0]), -1.0, SelectionRule(), "baseline_loss"),
    ("no-finite-val", recs([1.0, 2.0], [NAN, INF]), BASE, SelectionRule(), "finite val_loss"),
    ("window-zero", recs([1.0]), BASE, SelectionRule(decline_window=0), "decline_window"),
    ("tolerance-negative", recs([1.0]), BASE, SelectionRule(tolerance=-0.01), "tolerance"),
    ("loss-ratio-zero", recs([1.0]), BASE, SelectionRule(loss_ratio=0.0), "loss_ratio"),
    ("loss-ratio-above-one", recs([1.0]), BASE, SelectionRule(loss_ratio=1.01), "loss_ratio"),
    ("unknown-strategy", recs([1.0]), BASE, SelectionRule(strategy="last"), "strategy"),
    ("steps-equal", recs([1.0, 2.0], steps=[10, 10]), BASE, SelectionRule(), "strictly increasing"),
    ("steps-decreasing", recs([1.0, 2.0], steps=[20, 10]), BASE, SelectionRule(), "strictly increasing"),
]


@pytest.mark.parametrize(
    ("records", "baseline", "rule", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(records, baseline, rule, message) -> None:
    with pytest.raises(ValueError, match=message):
        select_checkpoint(records, baseline, rule)


def test_selection_imports_no_torch() -> None:
    code = "import sys, training.selection; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
