"""A real run directory for packaging, handler and front-door tests: the real trainer (training.train) on
scikit-learn's bundled digits, short enough for tests, in the run-directory contract of the architecture."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from handlers.factory import ModelSpec
from training.config import ModelSection, TrainConfig
from training.train import train

_TRAINED: dict[tuple[int, str], Path] = {}


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 8, 8] scaled to [0, 1], labels as int64 [N]."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


def make_run(runs_dir: Path, name: str = "digits", seed: int = 0, norm: str = "batch") -> Path:
    """runs_dir/<name>: a short real training run (6 epochs, evaluated every 20 steps; about 5 s) whose
    selection satisfies the gradient-norm rule. Trained once per session and arguments, then copied."""
    key = (seed, norm)
    if key not in _TRAINED:
        scratch = Path(tempfile.mkdtemp(prefix="gradserve-run-"))
        atexit.register(shutil.rmtree, scratch, True)
        config = TrainConfig(name="run", runs_dir=str(scratch), seed=seed, epochs=6, eval_every=20, patience=None,
                             threads=1, progress=False, model=ModelSection(args={**ModelSection().args, "norm": norm}))
        _TRAINED[key] = train(config)
    run = runs_dir / name
    shutil.copytree(_TRAINED[key], run)
    return run


def selected_model(run: Path) -> torch.nn.Module:
    """The training code's own model, rebuilt from the selected checkpoint, in eval mode."""
    selection = json.loads((run / "selection.json").read_text())
    path = run / selection["checkpoints"][selection["selection"]["index"]]
    checkpoint = torch.load(path, weights_only=True)
    model = ModelSpec.from_dict(checkpoint["model_config"]).build()
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
