"""The multi-task training loop: one trunk, one head per task, the task losses balanced by GradNorm or equally.

`run_dir = train_multitask(TrainConfig(..., multitask=MultitaskSection(...)))`. It follows training/train.py
(whose single-task path it leaves alone) and writes the same run directory, with per task, per iteration:
the loss L_i, the weighted gradient norm G_i on the last shared layer, the weight w_i and the inverse rate r_i.

What the rest of the pipeline sees is the weighted total loss sum_i w_i L_i: the global gradient norm is that
loss's, the Records carry it (val_loss with the weights of that checkpoint), and the selection rule applies to
it. Single process only (no DDP) and no --resume.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from training import checkpoint
from training.config import TrainConfig
from training.data import Splits, batch_bounds, batches, load_splits, shard_indices
from training.distributed import Dist
from training.gradnorm import TaskWeights, last_shared_weight, task_grad_norms
from training.model import ModelConfig, build_model
from training.monitor import GradNormMonitor, clip_grads_, global_grad_norm, grads_of
from training.multitask_report import write_task_report
from training.report import write_report
from training.selection import Record
from training.summary import load_model, summarize, write_json, write_selection
from training.tasks import Task, describe, evaluate_tasks, extra_heads, task_losses, tasks_named
from training.train import NonFiniteError, fresh_run_dir, has_batchnorm, lr_at, pick_device


@dataclass(frozen=True)
class Step:
    """What one forward/backward computed; the model's .grad holds the gradient of `loss` alone."""

    loss: torch.Tensor  # sum_i w_i L_i, the loss the network trains on
    losses: torch.Tensor  # (T,) L_i
    norms: torch.Tensor  # (T,) G_i = w_i ||grad_W L_i||
    rates: torch.Tensor  # (T,) r_i
    weights: torch.Tensor  # (T,) the w_i this step used
    grad_loss: float  # L_grad


def forward_backward(
    model: nn.Module, tasks: list[Task], balancer: TaskWeights, shared: nn.Parameter, x: torch.Tensor, y: torch.Tensor
) -> Step:
    """forward -> per-task losses -> their gradient norms on W -> backward of sum_i w_i L_i -> the weights' gradient."""
    outputs = model.forward_all(x)  # type: ignore[operator]  # {"logits": (B, K), <head>: (B, k)}
    losses = task_losses(tasks, outputs, x, y)  # (T,)
    norms = task_grad_norms(losses, shared)  # (T,) ||grad_W L_i||, detached
    weights = balancer.values()
    loss = (weights * losses).sum()  # the weights enter as constants: only L_grad moves them
    loss.backward()
    grad_loss, g, rates = balancer.backward(losses.detach(), norms)
    return Step(loss.detach(), losses.detach(), g, rates, weights.clone(), grad_loss)


def weighted(scores: dict[str, dict[str, float]], tasks: list[Task], weights: torch.Tensor) -> float:
    return sum(float(w) * scores[t.name]["loss"] for t, w in zip(tasks, weights, strict=True))


def by_task(tasks: list[Task], values: torch.Tensor) -> dict[str, float]:
    return {t.name: float(v) for t, v in zip(tasks, values, strict=True)}


def train_multitask(cfg: TrainConfig, data: Splits | None = None, dist: Dist | None = None) -> Path:
    """Train the tasks of cfg.multitask, checkpoint every evaluation, select by the rule; returns runs/<name>."""
    if cfg.multitask is None:
        raise ValueError("train_multitask needs a config with a multitask section; use training.train.train")
    dist = dist or Dist()
    if dist.enabled:
        raise SystemExit("multitask training runs in one process; drop --nproc / torchrun")
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg, dist)
    run_dir = Path(cfg.runs_dir) / cfg.name
    say = tqdm.write
    mt = cfg.multitask

    # ---- data and tasks ---------------------------------------------------------------------------------------
    data = data or load_splits(cfg.dataset, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    tasks = tasks_named(mt.tasks)
    c, h, w = data.shape

    # ---- model (one trunk, a head per task), its optimizer, and the task weights with theirs --------------------
    torch.manual_seed(cfg.seed)
    model_config = ModelConfig(
        in_channels=c,
        height=h,
        width=w,
        num_classes=len(data.labels),
        channels=cfg.model.channels,
        norm=cfg.model.norm,
        dropout=cfg.model.dropout,
        extra_heads=extra_heads(tasks),
    )
    model = build_model(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    balancer = TaskWeights(len(tasks), mt.alpha, mt.weight_lr, learn=mt.method == "gradnorm", device=device)
    shared = last_shared_weight(model)
    monitor = GradNormMonitor(cfg.explosion_factor, cfg.vanishing_floor, cfg.median_window)
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())

    bounds = batch_bounds(len(data.train), cfg.batch_size, drop_single=has_batchnorm(model))
    iters_per_epoch = len(bounds)
    total = cfg.epochs * iters_per_epoch
    eval_every = cfg.eval_every or iters_per_epoch
    say(
        f"multitask {mt.method} (alpha {mt.alpha}) over tasks {list(mt.tasks)}: train {len(data.train)} images, "
        f"{total} iterations, evaluating every {eval_every}, device {device}"
    )

    fresh_run_dir(run_dir)
    (run_dir / "tasks.png").unlink(missing_ok=True)
    # Baseline: the fresh model's weighted validation loss, in eval mode (BatchNorm stats untouched).
    baseline_loss = weighted(evaluate_tasks(model, data.val, tasks, device), tasks, balancer.values())
    say(f"baseline weighted val loss {baseline_loss:.4f}; loss gate {cfg.selection.loss_ratio * baseline_loss:.4f}")

    iteration, step = 0, 0
    records: list[Record] = []
    saved_checkpoints: list[str] = []
    best_val, best_step, evals_since_best = math.inf, 0, 0
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, iteration, total)
    window = {"norm_sum": 0.0, "norm_n": 0, "loss_sum": 0.0, "loss_n": 0}
    stop_reason = f"completed {cfg.epochs} epochs ({total} iterations)"
    stopping = False
    bar = tqdm(total=total, disable=not cfg.progress, dynamic_ncols=True)
    model.train()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        for epoch in range(cfg.epochs):
            order = shard_indices(len(data.train), epoch, cfg.seed)
            for x, y in batches(data.train, order, bounds):
                x, y = x.to(device), y.to(device)  # (B, C, H, W), (B,)
                bn_stats = [b.clone() for b in buffers]  # put back if this step is skipped
                optimizer.zero_grad(set_to_none=True)
                s = forward_backward(model, tasks, balancer, shared, x, y)

                # the global gradient norm of the weighted total loss, before clipping
                grads = grads_of(params)
                norm = global_grad_norm(grads)
                norm_value, loss_value = norm.item(), s.loss.item()
                flags = monitor.observe(norm_value, loss_value)
                if flags.finite:
                    if cfg.max_grad_norm is not None:
                        clip_grads_(grads, norm, cfg.max_grad_norm)
                    optimizer.step()
                    balancer.step()  # w_i by L_grad, then renormalised to sum to T
                    step += 1
                    window["norm_sum"] += norm_value
                    window["norm_n"] += 1
                    window["loss_sum"] += loss_value
                    window["loss_n"] += 1
                else:
                    torch._foreach_copy_(buffers, bn_stats)
                    say(f"iteration {iteration + 1}: non-finite loss {loss_value} / grad norm {norm_value}; skipped")
                    if monitor.nonfinite_in_row >= cfg.max_nonfinite_in_row:
                        raise NonFiniteError(
                            f"{monitor.nonfinite_in_row} iterations in a row had a non-finite loss or gradient norm; "
                            "lower lr, set max_grad_norm, or check the inputs for NaN/inf"
                        )

                lr = optimizer.param_groups[0]["lr"]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, iteration + 1, total)
                iteration += 1
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
                    "task_losses": by_task(tasks, s.losses),
                    "task_grad_norms": by_task(tasks, s.norms),
                    "task_weights": by_task(tasks, s.weights),
                    "inverse_rates": by_task(tasks, s.rates),
                    "grad_loss": s.grad_loss,
                }
                metrics.write(json.dumps(line) + "\n")
                bar.update()

                if iteration % eval_every and iteration != total:
                    continue
                # ---- evaluate -> Record -> checkpoint -> early stopping -------------------------------------------
                scores = evaluate_tasks(model, data.val, tasks, device)
                weights = balancer.values()
                val_loss = weighted(scores, tasks, weights)
                grad_norm = window["norm_sum"] / window["norm_n"] if window["norm_n"] else math.nan
                train_loss = window["loss_sum"] / window["loss_n"] if window["loss_n"] else math.nan
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
                        f"early stopping: weighted validation loss did not improve by min_delta={cfg.min_delta} for "
                        f"{cfg.patience} evaluations (best {best_val:.4f} at step {best_step})"
                    )
                rel = f"checkpoints/step-{step}.pt"
                saved_checkpoints.append(rel)
                payload = {
                    "format_version": checkpoint.FORMAT_VERSION,
                    "model_config": model_config.to_dict(),
                    "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "total": total,
                                  "iteration": iteration, "lr": optimizer.param_groups[0]["lr"]},
                    "step": step,
                    "epoch": epoch + 1,
                    "rng": {"torch": torch.get_rng_state()},
                    "record": asdict(record),
                    "config": cfg.to_dict(),
                    "data": {**data.describe(), "tasks": describe(tasks)},
                    "multitask": {"method": mt.method, "tasks": list(mt.tasks), **balancer.state_dict()},
                }
                checkpoint.save_atomic(payload, run_dir / rel)
                checkpoint.save_atomic(payload, checkpoint.last_path(run_dir))
                line = {
                    "kind": "eval",
                    "iteration": iteration,
                    "epoch": epoch + 1,
                    **asdict(record),
                    "val_accuracy": scores["class"]["accuracy"],
                    "tasks": scores,
                    "task_weights": by_task(tasks, weights),
                    "checkpoint": rel,
                    "nonfinite_total": monitor.nonfinite_total,
                }
                if stopping:
                    line["stop_reason"] = stop_reason
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                per_task = ", ".join(f"{n} {m}" for n, m in by_task(tasks, weights).items())
                say(f"step {step}: weighted val loss {val_loss:.4f}, grad norm {grad_norm:.3f}, weights {per_task}")
                if stopping:
                    break
            if stopping:
                break
    bar.close()

    # ---- the end: selection.json, summary.json (with per-task test metrics), report.png, tasks.png -------------
    say(stop_reason)
    selection = write_selection(run_dir, records, saved_checkpoints, baseline_loss, cfg.selection)
    say(f"selected step {selection.step} (rule satisfied: {selection.rule_satisfied}): {selection.reason}")
    run_info = {
        "name": cfg.name,
        "stop_reason": stop_reason,
        "iterations": iteration,
        "steps": step,
        "iterations_per_epoch": iters_per_epoch,
        "processes": 1,
        "nonfinite_steps": monitor.nonfinite_total,
        "exploding_iterations": monitor.exploding_total,
        "vanishing_iterations": monitor.vanishing_total,
        "wall_time_s": time.perf_counter() - started,
    }
    summary = summarize(run_dir, data, device, run_info)
    summary["multitask"] = task_summary(run_dir, cfg, data, tasks, saved_checkpoints, selection.index, device)
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir, loss_label="weighted total loss")
    write_task_report(run_dir)
    say(f"test metrics of the selected checkpoint: {summary['multitask']['test']['selected']}")
    return run_dir


def task_summary(
    run_dir: Path, cfg: TrainConfig, data: Splits, tasks: list[Task], checkpoints: list[str], chosen: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-task test metrics of the selected and the last checkpoint, and the weights they trained with."""
    assert cfg.multitask is not None
    test = {}
    for label, rel in (("selected", checkpoints[chosen]), ("last", checkpoints[-1])):
        test[label] = evaluate_tasks(load_model(run_dir / rel, device), data.test, tasks, device)
    final = checkpoint.load(run_dir / checkpoints[-1])["multitask"]
    return {
        "method": cfg.multitask.method,
        "alpha": cfg.multitask.alpha,
        "tasks": describe(tasks),
        "final_weights": by_task(tasks, final["weights"]),
        "initial_losses": None if final["initial_losses"] is None else by_task(tasks, final["initial_losses"]),
        "test": test,
    }
