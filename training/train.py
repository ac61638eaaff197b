"""The training loop, watching the global gradient norm. `run_dir = train(TrainConfig(...))`.

One loop for every objective (training/objective.py): the single-task classifier, or, with a `multitask`
section, one trunk with a head per task and the task losses balanced by GradNorm (training/multitask.py).

Reads top to bottom in the order it runs: data, model, baseline, then per iteration
forward -> loss -> backward -> gradient norm -> optional clipping -> optimizer step -> learning rate,
and every `eval_every` iterations: evaluate -> Record -> checkpoint -> early stopping.
At the end: selection.json, summary.json, report.png.

Policies:
- BatchNorm never sees a batch of one sample: a trailing batch of one is dropped (see data.batch_bounds),
  and batch_size 1 with norm "batch" is refused by TrainConfig. Below 16 samples a warning suggests group/layer.
- A non-finite loss or gradient norm skips the optimizer step (and puts BatchNorm's running stats back as they
  were); the skip is counted and logged, and `max_nonfinite_in_row` skips in a row stop training with an error.
- DDP: gradients are all-reduced during backward, so the norm measured after it is the same on every rank
  (each evaluation cross-checks it). Rank 0 alone evaluates and writes. `sync_bn: true` converts BatchNorm
  to SyncBatchNorm on CUDA; PyTorch's SyncBatchNorm has no CPU kernel, so on CPU/gloo each rank keeps its
  own batch statistics and a warning says so.
- Resume: last.pt holds everything the loop carries (weights, optimizer, RNG, records, early-stopping state),
  so a run restarted with resume=True ends with the same weights as an uninterrupted one (single process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import checkpoint
from training.config import TrainConfig
from training.data import Splits, batch_bounds, batches, load_splits, shard_indices
from training.distributed import Dist
from training.model import ModelConfig, build_model
from training.monitor import GradNormMonitor, clip_grads_, global_grad_norm, grads_of
from training.objective import objective_for
from training.report import write_report
from training.selection import Record
from training.summary import summarize, write_selection

log = logging.getLogger("gradserve.train")

BN_MIN_BATCH = 16  # below this, BatchNorm's batch statistics are noisy enough to warn about


class NonFiniteError(RuntimeError):
    """Too many iterations in a row produced a non-finite loss or gradient norm."""


def lr_at(cfg: TrainConfig, iteration: int, total: int) -> float:
    """Linear warmup over warmup_steps, then the configured decay to min_lr_ratio * lr."""
    if iteration < cfg.warmup_steps:
        return cfg.lr * (iteration + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (iteration - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def pick_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but CUDA is not available; use device: auto or cpu")
    return torch.device("cuda", dist.local_rank)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fresh_run_dir(run_dir: Path) -> None:
    """Start a run from nothing: the artifacts of an earlier run of the same name would mix with ours."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "selection.json", "summary.json", "report.png", "tasks.png"):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def keep_metrics_until(path: Path, iterations_done: int) -> None:
    """On resume, drop the lines written after the checkpoint we resume from (and a half-written last line)."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["iteration"] <= iterations_done:
                kept.append(line + "\n")
    path.write_text("".join(kept))


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    ignore = {"progress", "threads", "runs_dir"}
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in ignore and saved.get(k) != now[k])
    if diff:
        raise SystemExit(f"cannot resume: settings {diff} differ from the checkpoint's; resume with the same config")


def train(cfg: TrainConfig, data: Splits | None = None, dist: Dist | None = None, resume: bool = False) -> Path:
    """Train, checkpoint every evaluation, select a checkpoint by the gradient-norm rule; returns runs/<name>."""
    dist = dist or Dist()
    objective = objective_for(cfg)
    if dist.enabled and not objective.supports_ddp:
        raise SystemExit("multitask training runs in one process; drop --nproc / torchrun")
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg, dist)
    run_dir = Path(cfg.runs_dir) / cfg.name
    say = tqdm.write if dist.is_main else (lambda _msg: None)

    # ---- data -----------------------------------------------------------------------------------------------
    data = data or load_splits(cfg.dataset, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    c, h, w = data.shape

    # ---- model and optimizer: the same initial weights on every rank --------------------------------------------
    torch.manual_seed(cfg.seed)
    model_config = ModelConfig(
        in_channels=c,
        height=h,
        width=w,
        num_classes=len(data.labels),
        channels=cfg.model.channels,
        norm=cfg.model.norm,
        dropout=cfg.model.dropout,
        extra_heads=objective.extra_heads(),
    )
    model = build_model(model_config).to(device)
    objective.start(model, device)
    uses_bn = has_batchnorm(model)
    if uses_bn and cfg.batch_size < BN_MIN_BATCH:
        log.warning(
            "BatchNorm with batch_size %d (< %d): its batch statistics will be noisy; "
            "consider model.norm: group or model.norm: layer",
            cfg.batch_size,
            BN_MIN_BATCH,
        )
    if cfg.sync_bn and dist.enabled and uses_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("sync_bn: SyncBatchNorm needs CUDA; on CPU/gloo each rank keeps its own BatchNorm statistics")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"  # TrainConfig refuses amp with a multitask section
    if cfg.amp and not use_amp:
        log.warning("amp: mixed precision is used on CUDA only; training in float32 on %s", device)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    monitor = GradNormMonitor(cfg.explosion_factor, cfg.vanishing_floor, cfg.median_window)

    # ---- iterations: every rank walks its shard of the same seeded shuffle ---------------------------------------
    per_rank = math.ceil(len(data.train) / dist.world)
    bounds = batch_bounds(per_rank, cfg.batch_size, drop_single=uses_bn)
    iters_per_epoch = len(bounds)
    total = cfg.epochs * iters_per_epoch
    eval_every = cfg.eval_every or iters_per_epoch
    full = math.ceil(per_rank / cfg.batch_size)
    dropped = " - 1 (a trailing batch of one is dropped for BatchNorm)" if iters_per_epoch < full else ""
    say(
        f"train {len(data.train)} / val {len(data.val)} / test {len(data.test)} images of {c}x{h}x{w}, "
        f"{dist.world} process(es), device {device}\n"
        f"iterations per epoch = ceil({per_rank} / {cfg.batch_size}) = {full}{dropped}; "
        f"total = {cfg.epochs} epochs x {iters_per_epoch} = {total} iterations; evaluating every {eval_every}"
    )
    if intro := objective.describe():
        say(intro)

    # ---- state the loop carries (all of it is in last.pt) -------------------------------------------------------
    iteration, step = 0, 0  # iterations run, optimizer steps taken (skipped iterations take none)
    records: list[Record] = []
    saved_checkpoints: list[str] = []
    best_val, best_step, evals_since_best = math.inf, 0, 0
    baseline_loss = math.nan
    if resume:
        last = checkpoint.last_path(run_dir)
        if not last.exists():
            raise SystemExit(f"nothing to resume: {last} does not exist; train without --resume")
        ckpt = checkpoint.load(last, map_location=device)
        check_resumable(ckpt["config"], cfg)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = ckpt["resume"]
        iteration, step = state["iteration"], ckpt["step"]
        records = [Record(**r) for r in state["records"]]
        saved_checkpoints = list(state["checkpoints"])
        best_val, best_step, evals_since_best = state["best_val"], state["best_step"], state["evals_since_best"]
        baseline_loss = state["baseline_loss"]
        monitor.load_state_dict(state["monitor"])
        objective.load_state_dict(state.get("objective", {}))
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        started -= state["wall_time_s"]
        if dist.is_main:
            keep_metrics_until(run_dir / "metrics.jsonl", iteration)
        say(f"resuming from {checkpoint.last_path(run_dir)} at iteration {iteration} (step {step})")
    elif dist.is_main:
        fresh_run_dir(run_dir)
        # Baseline: the freshly initialised model's validation loss, in eval mode (BatchNorm stats untouched).
        baseline_loss, baseline_fields = objective.evaluate(model, data.val, device)
        say(
            f"baseline {objective.loss_name} {baseline_loss:.4f}{objective.evaluation_note(baseline_fields)}; "
            f"loss gate {cfg.selection.loss_ratio} x baseline = {cfg.selection.loss_ratio * baseline_loss:.4f}"
        )
    if dist.enabled:
        torch_dist.barrier()  # rank 0 has cleared the run directory before anyone trains
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raw_model: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(raw_model.buffers())
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, iteration, total)

    metrics = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None  # noqa: SIM115 (closed below)
    bar = tqdm(total=total, initial=iteration, disable=not (cfg.progress and dist.is_main), dynamic_ncols=True)
    window = {"norm_sum": 0.0, "norm_n": 0, "loss_sum": 0.0, "loss_n": 0}  # since the last record
    stop_reason = f"completed {cfg.epochs} epochs ({total} iterations)"
    stopping = False
    model.train()
    try:
        for epoch in range(iteration // iters_per_epoch, cfg.epochs):
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            order = shard_indices(len(data.train), epoch, cfg.seed, dist.rank, dist.world)
            first = iteration - epoch * iters_per_epoch  # > 0 only when resuming mid-epoch
            for x, y in batches(data.train, order, bounds[first:]):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, C, H, W), (B,)

                # forward -> loss -> backward
                bn_stats = [b.clone() for b in buffers]  # put back if this step is skipped
                loss = objective.backward(model, x, y, optimizer, scaler, use_amp)

                # gradient norm: after AMP unscaling and the DDP all-reduce, before clipping; one host sync
                grads = grads_of(params)
                norm = global_grad_norm(grads)
                norm_value = norm.item()  # the one wait per iteration: the loss is computed by then
                loss_value = loss.item()
                flags = monitor.observe(norm_value, loss_value)

                # optional clipping -> optimizer step (skipped when the loss or norm is not finite)
                if flags.finite:
                    if cfg.max_grad_norm is not None:
                        clip_grads_(grads, norm, cfg.max_grad_norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                    else:
                        optimizer.step()
                    objective.stepped()
                    step += 1
                    window["norm_sum"] += norm_value
                    window["norm_n"] += 1
                    window["loss_sum"] += loss_value
                    window["loss_n"] += 1
                else:
                    torch._foreach_copy_(buffers, bn_stats)
                    say(
                        f"iteration {iteration + 1}: non-finite loss {loss_value} / grad norm {norm_value}; "
                        f"step skipped ({monitor.nonfinite_in_row} in a row, {monitor.nonfinite_total} in all)"
                    )
                    if monitor.nonfinite_in_row >= cfg.max_nonfinite_in_row:
                        raise NonFiniteError(
                            f"{monitor.nonfinite_in_row} iterations in a row had a non-finite loss or gradient norm "
                            f"(last at iteration {iteration + 1}, epoch {epoch + 1}); lower lr, set max_grad_norm, "
                            "or check the inputs for NaN/inf"
                        )
                if scaler is not None:
                    scaler.update()
                if flags.exploding or flags.vanishing:
                    kind = "exploding" if flags.exploding else "vanishing"
                    say(f"iteration {iteration + 1}: {kind} gradient norm {norm_value:.3g}")

                # learning rate for the next iteration: warmup, then the schedule
                lr = optimizer.param_groups[0]["lr"]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, iteration + 1, total)
                iteration += 1

                if metrics is not None:
                    line = {
                        "kind": "iter",
                        "iteration": iteration,
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": loss_value,
                        "grad_norm": norm_value,
                        "lr": lr,
                        "skipped": not flags.finite,
                        "exploding": flags.exploding,
                        "vanishing": flags.vanishing,
                        **objective.iteration_fields(),
                    }
                    metrics.write(json.dumps(line) + "\n")
                bar.update()
                if iteration % 10 == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", grad_norm=f"{norm_value:.3f}", refresh=False)

                if iteration % eval_every and iteration != total:
                    continue
                # ---- evaluate -> Record -> checkpoint -> early stopping ---------------------------------------
                sums = torch.tensor(
                    [window["norm_sum"], window["norm_n"], window["loss_sum"], window["loss_n"]], dtype=torch.float64
                )
                by_rank = [sums[0].item() / max(1.0, sums[1].item())]
                if dist.enabled:
                    gathered = [torch.zeros_like(sums) for _ in range(dist.world)]
                    torch_dist.all_gather(gathered, sums)
                    by_rank = [float(s[0] / s[1].clamp(min=1)) for s in gathered]
                    sums = torch.stack(gathered).sum(0) / dist.world
                    if max(by_rank) - min(by_rank) > 1e-6 * max(by_rank):
                        log.warning("ranks saw different gradient norms %s: gradients are not synchronised", by_rank)
                val = torch.zeros(1, dtype=torch.float64)
                fields: dict[str, Any] = {}
                if dist.is_main:
                    val_loss, fields = objective.evaluate(raw_model, data.val, device)
                    val[0] = val_loss
                if dist.enabled:
                    torch_dist.broadcast(val, src=0)  # every rank takes the same early-stopping decision
                val_loss = float(val[0])
                grad_norm = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
                train_loss = float(sums[2] / sums[3]) if sums[3] > 0 else math.nan
                record = Record(step=step, grad_norm=grad_norm, train_loss=train_loss, val_loss=val_loss)
                records.append(record)
                window = dict.fromkeys(window, 0)
                if val_loss < best_val - cfg.min_delta:
                    best_val, best_step, evals_since_best = val_loss, step, 0
                else:
                    evals_since_best += 1
                if cfg.patience is not None and evals_since_best >= cfg.patience:
                    stopping = True
                    stop_reason = (
                        f"early stopping: {objective.loss_name} did not improve by min_delta={cfg.min_delta} for "
                        f"{cfg.patience} evaluations (best {best_val:.4f} at step {best_step})"
                    )
                if metrics is not None:
                    rel = f"checkpoints/step-{step}.pt"
                    saved_checkpoints.append(rel)
                    payload = {
                        "format_version": checkpoint.FORMAT_VERSION,
                        "model_config": model_config.to_dict(),
                        "state_dict": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": {
                            "schedule": cfg.schedule,
                            "warmup_steps": cfg.warmup_steps,
                            "total": total,
                            "iteration": iteration,
                            "lr": optimizer.param_groups[0]["lr"],
                        },
                        "step": step,
                        "epoch": epoch + 1,
                        "rng": {"torch": torch.get_rng_state()},
                        "record": asdict(record),
                        "config": cfg.to_dict(),
                        "data": {**data.describe(), **objective.data_fields()},
                        **objective.checkpoint_fields(),
                        "resume": {
                            "iteration": iteration,
                            "records": [asdict(r) for r in records],
                            "checkpoints": saved_checkpoints,
                            "baseline_loss": baseline_loss,
                            "best_val": best_val,
                            "best_step": best_step,
                            "evals_since_best": evals_since_best,
                            "monitor": monitor.state_dict(),
                            "objective": objective.state_dict(),
                            "scaler": scaler.state_dict() if scaler else {},
                            "wall_time_s": time.perf_counter() - started,
                        },
                    }
                    checkpoint.save_atomic(payload, run_dir / rel)
                    checkpoint.save_atomic(payload, checkpoint.last_path(run_dir))
                    line = {
                        "kind": "eval",
                        "iteration": iteration,
                        "epoch": epoch + 1,
                        **asdict(record),
                        **fields,
                        "grad_norm_by_rank": by_rank,
                        "checkpoint": rel,
                        "nonfinite_total": monitor.nonfinite_total,
                    }
                    if stopping:
                        line["stop_reason"] = stop_reason
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    say(
                        f"step {step}: {objective.loss_name} {val_loss:.4f}{objective.evaluation_note(fields)}, "
                        f"grad norm {grad_norm:.3f}, train loss {train_loss:.4f}"
                    )
                if stopping:
                    break
            if stopping:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    # ---- the end: selection.json, summary.json, report.png (rank 0) ---------------------------------------------
    if dist.is_main:
        say(stop_reason)
        selection = write_selection(run_dir, records, saved_checkpoints, baseline_loss, cfg.selection)
        say(f"selected step {selection.step} (rule satisfied: {selection.rule_satisfied}): {selection.reason}")
        run_info = {
            "name": cfg.name,
            "stop_reason": stop_reason,
            "iterations": iteration,
            "steps": step,
            "iterations_per_epoch": iters_per_epoch,
            "processes": dist.world,
            "nonfinite_steps": monitor.nonfinite_total,
            "exploding_iterations": monitor.exploding_total,
            "vanishing_iterations": monitor.vanishing_total,
            "wall_time_s": time.perf_counter() - started,
        }
        summary = summarize(run_dir, data, device, run_info)
        closing = objective.finish(run_dir, summary, data, saved_checkpoints, selection.index, device)
        write_report(run_dir, loss_label=objective.report_label)
        say(closing)
    if dist.enabled:
        torch_dist.barrier()
    return run_dir
