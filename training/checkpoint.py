"""Self-describing checkpoints, written atomically (temp file, then os.replace), loaded with weights_only=True.

runs/<name>/checkpoints/step-<N>.pt, one per evaluation, and last.pt (a copy of the latest), hold the dict
`payload` builds (ARCHITECTURE.md, "Checkpoint"); a second program rebuilds the model from the file alone:

    format_version  FORMAT_VERSION
    model_config    ModelSpec.to_dict() (handlers/factory.py): factory, args, in_shape, num_classes
    state_dict      the model's weights (the bare model's, never the DDP wrapper's)
    optimizer       the optimizer's state_dict
    scheduler       schedule, warmup_steps, total (iterations), iteration, lr (the next iteration's)
    step            optimizer steps taken
    epoch           the epoch of the evaluation, from 1
    rng             {"torch": the CPU generator's state}
    record          the Record of the evaluation (step, grad_norm, train_loss, val_loss)
    config          TrainConfig.to_dict()
    data            the data's description (shape, labels, task, preprocess: the input contract and the train split's
                    statistics) and the objective's (a multi-task run's tasks)
    ...             the objective's own top-level fields (a multi-task run's `multitask`: method, tasks, weights)
    resume          what `--resume` needs to continue exactly (`restore` reads it back): TrainState but its window
                    (empty at a checkpoint), the monitor's, objective's and GradScaler's state, wall_time_s
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradserve.errors import UsageError
from training.selection import Record
from training.state import TrainState

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.setup import Run

FORMAT_VERSION = 2  # 2: model_config is a factory's ModelSpec, data carries the preprocessing


def payload(run: Run, state: TrainState, epoch: int) -> dict[str, Any]:
    """The checkpoint of the evaluation that just added its Record (the last of state.records)."""
    cfg = run.cfg
    return {
        "format_version": FORMAT_VERSION,
        "model_config": run.model_spec.to_dict(),
        "state_dict": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {
            "schedule": cfg.schedule,
            "warmup_steps": cfg.warmup_steps,
            "total": run.total,
            "iteration": state.iteration,
            "lr": run.optimizer.param_groups[0]["lr"],
        },
        "step": state.step,
        "epoch": epoch + 1,
        "rng": {"torch": torch.get_rng_state()},
        "record": asdict(state.records[-1]),
        "config": cfg.to_dict(),
        "data": {**run.data.describe(), **run.objective.data_fields()},
        **run.objective.checkpoint_fields(),
        "resume": {
            "iteration": state.iteration,
            "records": [asdict(r) for r in state.records],
            "checkpoints": state.checkpoints,
            "baseline_loss": state.baseline_loss,
            "best_val": state.best_val,
            "best_step": state.best_step,
            "evals_since_best": state.evals_since_best,
            "monitor": run.monitor.state_dict(),
            "objective": run.objective.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else {},
            "wall_time_s": state.elapsed_s(),
        },
    }


def restore(run: Run, started: float) -> TrainState:
    """Load last.pt into the run's model, optimizer, RNG, monitor, objective and scaler; returns the loop's state
    as it was when last.pt was written (`started`: when this process started, moved back by the time run)."""
    last = last_path(run.run_dir)
    if not last.exists():
        raise UsageError(f"nothing to resume: {last} does not exist; train without --resume")
    ckpt = load(last, map_location=run.device)
    check_resumable(ckpt["config"], run.cfg)
    run.model.load_state_dict(ckpt["state_dict"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    saved = ckpt["resume"]
    run.monitor.load_state_dict(saved["monitor"])
    run.objective.load_state_dict(saved.get("objective", {}))
    if run.scaler is not None and saved["scaler"]:
        run.scaler.load_state_dict(saved["scaler"])
    return TrainState(
        iteration=saved["iteration"],
        step=ckpt["step"],
        records=[Record(**r) for r in saved["records"]],
        checkpoints=list(saved["checkpoints"]),
        baseline_loss=saved["baseline_loss"],
        best_val=saved["best_val"],
        best_step=saved["best_step"],
        evals_since_best=saved["evals_since_best"],
        started=started - saved["wall_time_s"],
    )


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Resuming with other settings would not continue the same run; progress, threads and runs_dir do not matter."""
    ignore = {"progress", "threads", "runs_dir"}
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in ignore and saved.get(k) != now[k])
    if diff:
        raise UsageError(f"cannot resume: settings {diff} differ from the checkpoint's; resume with the same config")


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
