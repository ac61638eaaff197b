"""Self-describing checkpoints, written atomically (temp file, then os.replace), loaded with weights_only=True.

Layout of the dict (ARCHITECTURE.md, "Checkpoint"): format_version, model_config, state_dict, optimizer,
scheduler, step, epoch, rng, record, config, data, plus `resume` (what `--resume` needs to continue exactly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def step_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}.pt"


def last_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """A reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a gradserve checkpoint of format_version {FORMAT_VERSION}")
    return ckpt
