"""A real run directory for packaging and handler tests, in the run-directory contract of BRIEF.md.

Trains the real ConvNet of training/model.py for a few hundred steps on scikit-learn's bundled digits and
writes checkpoints/step-<N>.pt, last.pt and selection.json. The lead may switch this to training.train later.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from training.model import ModelConfig, build_model

LABELS = [str(i) for i in range(10)]
RULE = {"decline_window": 3, "tolerance": 0.03, "loss_ratio": 0.95, "strategy": "best"}


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 8, 8] scaled to [0, 1], labels as int64 [N]."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


def make_run(runs_dir: Path, name: str = "digits", steps: int = 200, eval_every: int = 40,
             rule_satisfied: bool = True, seed: int = 0, norm: str = "batch") -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: one thread is the fastest
    try:
        return _train(runs_dir, name, steps, eval_every, rule_satisfied, seed, norm)
    finally:
        torch.set_num_threads(threads)


def _train(runs_dir: Path, name: str, steps: int, eval_every: int, rule_satisfied: bool, seed: int,
           norm: str) -> Path:
    torch.manual_seed(seed)
    images, labels = digits()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    train_x, train_y, val_x, val_y = x[:1400], y[:1400], x[1400:], y[1400:]
    config = ModelConfig(norm=norm)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    run = runs_dir / name
    (run / "checkpoints").mkdir(parents=True)
    baseline = _val_loss(model, val_x, val_y)
    records: list[dict] = []
    checkpoints: list[str] = []
    norms: list[float] = []
    losses: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(train_x), (32,), generator=generator)
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())
        losses.append(loss.item())
        optimizer.step()
        if step % eval_every:
            continue
        record = {"step": step, "grad_norm": float(np.mean(norms)), "train_loss": float(np.mean(losses)),
                  "val_loss": _val_loss(model, val_x, val_y)}
        norms, losses = [], []
        checkpoint = {
            "format_version": 1, "model_config": config.to_dict(), "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": {}, "step": step, "epoch": step * 32 // 1400,
            "rng": {"torch": torch.get_rng_state()}, "record": record,
            "config": {"name": name, "seed": seed, "steps": steps, "lr": 3e-3, "batch_size": 32},
            "data": {"dataset": "digits", "shape": [1, 8, 8], "labels": LABELS, "scale": 1 / 16},
        }
        path = f"checkpoints/step-{step}.pt"
        torch.save(checkpoint, run / path)
        torch.save(checkpoint, run / "checkpoints" / "last.pt")
        records.append(record)
        checkpoints.append(path)

    best = min(range(len(records)), key=lambda i: records[i]["val_loss"])
    selection = {
        "index": best, "step": records[best]["step"], "rule_satisfied": rule_satisfied,
        "reason": "lowest validation loss after a settled decline" if rule_satisfied
        else "fallback: no settled decline of the gradient norm after its peak",
        "peak_index": 0, "eligible": [best] if rule_satisfied else [],
    }
    (run / "selection.json").write_text(json.dumps({
        "selection": selection, "rule": RULE, "baseline_loss": baseline, "records": records,
        "checkpoints": checkpoints}, indent=2))
    assert math.isfinite(baseline)
    return run


def selected_model(run: Path) -> torch.nn.Module:
    """The training code's own model, rebuilt from the selected checkpoint, in eval mode."""
    selection = json.loads((run / "selection.json").read_text())
    path = run / selection["checkpoints"][selection["selection"]["index"]]
    checkpoint = torch.load(path, weights_only=True)
    model = build_model(checkpoint["model_config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _val_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()

