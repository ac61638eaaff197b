"""The training loop, watching the global gradient norm. `run_dir = train(TrainConfig(...))`.

One loop for every objective (training/objective.py): the single-task classifier, or, with a `multitask`
section, one trunk with a head per task and the task losses balanced by GradNorm (training/multitask/).

`train` reads top to bottom in the order it runs: set up (training/setup.py: data, model, optimizer), start
(clear the run directory, measure the baseline) or resume, then per iteration `train_step`
(forward -> loss -> backward -> gradient norm -> optional clipping -> optimizer step or skip -> learning rate),
and every `eval_every` iterations `evaluate_and_checkpoint` (evaluate -> Record -> early stopping -> checkpoint).
At the end, `finish`: selection.json, summary.json, report.png. What the loop carries is a TrainState
(training/state.py); the checkpoint's layout is in training/checkpoint.py.

Policies:
- BatchNorm never sees a batch of one sample: a trailing batch of one is dropped (see data.batch_bounds),
  and batch_size 1 with norm "batch" is refused by TrainConfig. Below 16 samples a warning suggests group/layer
  (setup.py).
- A non-finite loss or gradient norm skips the optimizer step (and puts BatchNorm's running stats back as they
  were); the skip is counted and logged, and `max_nonfinite_in_row` skips in a row stop training with an error
  (`skip_step`).
- DDP: gradients are all-reduced during backward, so the norm measured after it is the same on every rank
  (each evaluation cross-checks it, `window_means`). Rank 0 alone evaluates and writes. `sync_bn: true` converts
  BatchNorm to SyncBatchNorm on CUDA; PyTorch's SyncBatchNorm has no CPU kernel, so on CPU/gloo each rank keeps
  its own batch statistics and a warning says so (setup.py).
- Resume: last.pt holds everything the loop carries (weights, optimizer, RNG, the TrainState, the monitor's
  and the objective's state; checkpoint.restore reads it back), so a run restarted with resume=True ends with
  the same weights as an uninterrupted one (single process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from gradserve.errors import UsageError
from handlers.factory import BUILTIN
from training import checkpoint
from training.config import TrainConfig
from training.data import Splits, batches, shard_indices
from training.distributed import Dist
from training.model_code import RUN_CODE, stage_model_code
from training.monitor import clip_grads_, global_grad_norm, grads_of
from training.multitask.objective import MultitaskObjective
from training.objective import Objective, RegressionObjective
from training.report import write_report
from training.selection import Record
from training.setup import Run, distribute, setup
from training.state import TrainState, Window
from training.summary import summarize, write_selection

log = logging.getLogger("gradserve.train")


class NonFiniteError(RuntimeError):
    """Too many iterations in a row produced a non-finite loss or gradient norm."""


def train(
    cfg: TrainConfig,
    data: Splits | None = None,
    dist: Dist | None = None,
    resume: bool = False,
    objective: Objective | None = None,
) -> Path:
    """Train, checkpoint every evaluation, select a checkpoint by the gradient-norm rule; returns runs/<name>.

    `data`: the config's dataset when None. `objective`: what the loop minimises; when None, the config's."""
    dist = dist or Dist()
    objective = objective or objective_for(cfg)
    if dist.enabled and not objective.supports_ddp:
        raise UsageError("multitask training runs in one process; drop --nproc / torchrun")
    started = time.perf_counter()
    run = setup(cfg, data, dist, objective)
    state = start_or_resume(run, resume, started)
    run = distribute(run)

    # metrics.jsonl: a line per iteration and one per evaluation, appended to what a resumed run kept (rank 0)
    metrics = open(run.run_dir / "metrics.jsonl", "a") if dist.is_main else None  # noqa: SIM115 (closed below)
    show = cfg.progress and dist.is_main
    bar = tqdm(total=run.total, initial=state.iteration, disable=not show, dynamic_ncols=True)
    run.trained.train()
    try:
        for epoch, x, y in batches_to_go(run, state):
            line = train_step(run, state, x, y, epoch)
            if metrics is not None:
                metrics.write(json.dumps(line) + "\n")  # flushed at the next evaluation
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            bar.update()
            if state.iteration % 10 == 0:
                bar.set_postfix(loss=f"{line['loss']:.4f}", grad_norm=f"{line['grad_norm']:.3f}", refresh=False)
            if state.iteration % run.eval_every == 0 or state.iteration == run.total:  # the last one is evaluated
                evaluate_and_checkpoint(run, state, epoch, metrics)
                if state.stop_reason is not None:
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    if dist.is_main:
        finish(run, state)
    if dist.enabled:
        torch_dist.barrier()
    return run.run_dir


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective of a training config: a multitask section picks GradNorm/equal, regression the MSE, else
    cross-entropy."""
    if cfg.multitask is not None:
        return MultitaskObjective(cfg.multitask)
    return RegressionObjective() if cfg.task == "regression" else Objective()


def lr_at(cfg: TrainConfig, iteration: int, total: int) -> float:
    """Linear warmup over warmup_steps, then the configured decay to min_lr_ratio * lr."""
    if iteration < cfg.warmup_steps:
        return cfg.lr * (iteration + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (iteration - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def set_lr(run: Run, iteration: int) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.cfg, iteration, run.total)


# ---- start or resume ----------------------------------------------------------------------------------------------


def start_or_resume(run: Run, resume: bool, started: float) -> TrainState:
    """Resume: everything from last.pt. Start: an empty run directory and the baseline loss (rank 0)."""
    if resume:
        state = checkpoint.restore(run, started)
        if run.dist.is_main:
            keep_metrics_until(run.run_dir / "metrics.jsonl", state.iteration)
        run.say(f"resuming from {checkpoint.last_path(run.run_dir)} at iteration {state.iteration} (step {state.step})")
    else:
        state = TrainState(started=started)
        if run.dist.is_main:
            fresh_run_dir(run.run_dir)
            keep_model_code(run)
            # Baseline: the freshly initialised model's validation loss, in eval mode (BatchNorm stats untouched).
            state.baseline_loss, fields = run.objective.evaluate(run.model, run.data.val, run.device)
            ratio = run.cfg.selection.loss_ratio
            run.say(
                f"baseline {run.objective.loss_name} {state.baseline_loss:.4f}"
                f"{run.objective.evaluation_note(fields)}; "
                f"loss gate {ratio} x baseline = {ratio * state.baseline_loss:.4f}"
            )
    set_lr(run, state.iteration)
    return state


def fresh_run_dir(run_dir: Path) -> None:
    """Start a run from nothing: the artifacts of an earlier run of the same name would mix with ours."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / RUN_CODE, ignore_errors=True)
    for name in ("metrics.jsonl", "selection.json", "summary.json", "report.png", "tasks.png"):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def keep_model_code(run: Run) -> None:
    """A copy of the user's model code as it is now, in run_dir/code, where `gradserve package` takes it from: the
    archive carries the code these weights were trained with, even if the files change or the run moves to
    another machine. A module packaging would refuse (a name the serving side has) is left for it to explain."""
    if run.model_spec.factory == BUILTIN:
        return  # the archive carries this checkout's training/model.py
    try:
        stage_model_code(run.model_spec, run.cfg.code_dir, run.run_dir / RUN_CODE)
    except UsageError as e:
        run.say(f"the model code is not kept with the run: {e}")


def keep_metrics_until(path: Path, iterations_done: int) -> None:
    """On resume, drop the lines written after the checkpoint we resume from (and a half-written last line)."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["iteration"] <= iterations_done:
                kept.append(line + "\n")
    path.write_text("".join(kept))


# ---- one iteration ------------------------------------------------------------------------------------------------


def batches_to_go(run: Run, state: TrainState) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, x, y) from the state's iteration to the last epoch: every rank walks its shard of the same seeded
    shuffle of each epoch."""
    for epoch in range(state.iteration // run.iters_per_epoch, run.cfg.epochs):
        order = shard_indices(len(run.data.train), epoch, run.cfg.seed, run.dist.rank, run.dist.world)
        first = state.iteration - epoch * run.iters_per_epoch  # > 0 only when resuming mid-epoch
        for x, y in batches(run.data.train, order, run.bounds[first:]):
            yield epoch, x, y


def train_step(run: Run, state: TrainState, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, Any]:
    """forward -> loss -> backward -> gradient norm -> clip -> optimizer step (or skip) -> the next learning rate.
    Returns the iteration's metrics line."""
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)  # (B, C, H, W), (B,)
    bn_stats = [b.clone() for b in run.buffers]  # put back if this step is skipped
    loss = run.objective.backward(run.trained, x, y, run.optimizer, run.scaler, run.use_amp)

    # gradient norm: after AMP unscaling and the DDP all-reduce, before clipping; one host sync
    grads = grads_of(run.params)
    norm = global_grad_norm(grads)
    norm_value = norm.item()  # the one wait per iteration: the loss is computed by then
    loss_value = loss.item()
    flags = run.monitor.observe(norm_value, loss_value)

    # optional clipping -> optimizer step (skipped when the loss or norm is not finite)
    if flags.finite:
        if run.cfg.max_grad_norm is not None:
            clip_grads_(grads, norm, run.cfg.max_grad_norm)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
        run.objective.stepped()
        state.step += 1
        state.window.add(norm_value, loss_value)
    else:
        skip_step(run, state, bn_stats, loss_value, norm_value, epoch)
    if run.scaler is not None:
        run.scaler.update()
    if flags.exploding or flags.vanishing:
        kind = "exploding" if flags.exploding else "vanishing"
        run.say(f"iteration {state.iteration + 1}: {kind} gradient norm {norm_value:.3g}")

    # learning rate for the next iteration: warmup, then the schedule
    lr = run.optimizer.param_groups[0]["lr"]
    set_lr(run, state.iteration + 1)
    state.iteration += 1
    return {"kind": "iter", "iteration": state.iteration, "step": state.step, "epoch": epoch + 1, "loss": loss_value,
            "grad_norm": norm_value, "lr": lr, "skipped": not flags.finite, "exploding": flags.exploding,
            "vanishing": flags.vanishing, **run.objective.iteration_fields()}


def skip_step(
    run: Run, state: TrainState, bn_stats: list[torch.Tensor], loss_value: float, norm_value: float, epoch: int
) -> None:
    """No optimizer step: BatchNorm's running stats back as they were; too many skips in a row stop the run."""
    torch._foreach_copy_(run.buffers, bn_stats)
    in_row, total = run.monitor.nonfinite_in_row, run.monitor.nonfinite_total
    run.say(
        f"iteration {state.iteration + 1}: non-finite loss {loss_value} / grad norm {norm_value}; "
        f"step skipped ({in_row} in a row, {total} in all)"
    )
    if in_row >= run.cfg.max_nonfinite_in_row:
        raise NonFiniteError(
            f"{in_row} iterations in a row had a non-finite loss or gradient norm "
            f"(last at iteration {state.iteration + 1}, epoch {epoch + 1}); lower lr, set max_grad_norm, "
            "or check the inputs for NaN/inf"
        )


# ---- evaluate and checkpoint --------------------------------------------------------------------------------------


def evaluate_and_checkpoint(run: Run, state: TrainState, epoch: int, metrics: TextIO | None) -> None:
    """evaluate -> Record -> early stopping -> (rank 0) checkpoint and the evaluation's metrics line."""
    grad_norm, train_loss, by_rank = window_means(run.dist, state.window)
    val_loss, fields = validate(run)
    record = Record(step=state.step, grad_norm=grad_norm, train_loss=train_loss, val_loss=val_loss)
    state.records.append(record)
    state.window = Window()
    early_stopping(run, state, val_loss)
    if metrics is None:
        return
    path = checkpoint.step_path(run.run_dir, state.step)
    rel = path.relative_to(run.run_dir).as_posix()  # selection.json and metrics.jsonl name it from the run
    state.checkpoints.append(rel)
    payload = checkpoint.payload(run, state, epoch)
    checkpoint.save_atomic(payload, path)
    checkpoint.save_atomic(payload, checkpoint.last_path(run.run_dir))
    line = {"kind": "eval", "iteration": state.iteration, "epoch": epoch + 1, **asdict(record), **fields,
            "grad_norm_by_rank": by_rank, "checkpoint": rel, "nonfinite_total": run.monitor.nonfinite_total}
    if state.stop_reason is not None:
        line["stop_reason"] = state.stop_reason
    metrics.write(json.dumps(line) + "\n")
    metrics.flush()
    run.say(
        f"step {state.step}: {run.objective.loss_name} {val_loss:.4f}{run.objective.evaluation_note(fields)}, "
        f"grad norm {grad_norm:.3f}, train loss {train_loss:.4f}"
    )


def window_means(dist: Dist, window: Window) -> tuple[float, float, list[float]]:
    """(gradient norm, train loss) averaged over the steps since the last Record and over the ranks, and each
    rank's mean gradient norm: under DDP they must agree (the gradients are all-reduced)."""
    sums = window.sums()  # (4,)
    by_rank = [sums[0].item() / max(1.0, sums[1].item())]
    if dist.enabled:
        gathered = [torch.zeros_like(sums) for _ in range(dist.world)]
        torch_dist.all_gather(gathered, sums)
        by_rank = [float(s[0] / s[1].clamp(min=1)) for s in gathered]
        sums = torch.stack(gathered).sum(0) / dist.world
        if max(by_rank) - min(by_rank) > 1e-6 * max(by_rank):
            log.warning("ranks saw different gradient norms %s: gradients are not synchronised", by_rank)
    grad_norm = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
    train_loss = float(sums[2] / sums[3]) if sums[3] > 0 else math.nan
    return grad_norm, train_loss, by_rank


def validate(run: Run) -> tuple[float, dict[str, Any]]:
    """Rank 0 evaluates; every rank gets the validation loss, so all take the same early-stopping decision."""
    val = torch.zeros(1, dtype=torch.float64)
    fields: dict[str, Any] = {}
    if run.dist.is_main:
        val_loss, fields = run.objective.evaluate(run.model, run.data.val, run.device)
        val[0] = val_loss
    if run.dist.enabled:
        torch_dist.broadcast(val, src=0)
    return float(val[0]), fields


def early_stopping(run: Run, state: TrainState, val_loss: float) -> None:
    """Sets state.stop_reason after `patience` evaluations without an improvement of min_delta."""
    cfg = run.cfg
    if val_loss < state.best_val - cfg.min_delta:
        state.best_val, state.best_step, state.evals_since_best = val_loss, state.step, 0
    else:
        state.evals_since_best += 1
    if cfg.patience is not None and state.evals_since_best >= cfg.patience:
        state.stop_reason = (
            f"early stopping: {run.objective.loss_name} did not improve by min_delta={cfg.min_delta} for "
            f"{cfg.patience} evaluations (best {state.best_val:.4f} at step {state.best_step})"
        )


# ---- the end ------------------------------------------------------------------------------------------------------


def finish(run: Run, state: TrainState) -> None:
    """selection.json, summary.json (and what the objective adds to it), report.png; rank 0 only."""
    cfg, run_dir = run.cfg, run.run_dir
    stop_reason = state.stop_reason or f"completed {cfg.epochs} epochs ({run.total} iterations)"
    run.say(stop_reason)
    selection = write_selection(run_dir, state.records, state.checkpoints, state.baseline_loss, cfg.selection)
    run.say(f"selected step {selection.step} (rule satisfied: {selection.rule_satisfied}): {selection.reason}")
    run_info = {
        "name": cfg.name,
        "stop_reason": stop_reason,
        "iterations": state.iteration,
        "steps": state.step,
        "iterations_per_epoch": run.iters_per_epoch,
        "processes": run.dist.world,
        "nonfinite_steps": run.monitor.nonfinite_total,
        "exploding_iterations": run.monitor.exploding_total,
        "vanishing_iterations": run.monitor.vanishing_total,
        "wall_time_s": state.elapsed_s(),
    }
    summary = summarize(run_dir, run.data, run.device, run_info)
    closing = run.objective.finish(run_dir, summary, run.data, state.checkpoints, selection.index, run.device)
    write_report(run_dir, loss_label=run.objective.report_label)
    run.say(closing)
