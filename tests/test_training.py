"""The training loop: baseline, BatchNorm policies, any C x H x W, non-finite steps, artifacts, resume after a
SIGKILL of a real process, and DDP with two real processes on gloo."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gradserve.cli import main as gradserve_main
from gradserve.errors import UsageError
from handlers.factory import ModelSpec
from training import checkpoint
from training.cli import add_arguments, config_from_args
from training.config import ModelSection, TrainConfig
from training.data import Split, Splits, batch_bounds, make_splits
from training.datasets import load_digits_splits
from training.evaluate import evaluate
from training.model import ModelConfig, build_model
from training.monitor import GradNormMonitor, clip_grads_, global_grad_norm
from training.selection import Record, select_checkpoint
from training.train import NonFiniteError, lr_at, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelSection(args={"channels": [8, 16], "norm": "batch", "dropout": 0.0})


def tiny(tmp_path: Path, **kw: object) -> TrainConfig:
    base = dict(
        runs_dir=str(tmp_path / "runs"),
        epochs=2,
        batch_size=32,
        lr=0.01,
        warmup_steps=5,
        threads=1,
        progress=False,
        model=TINY,
    )
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def synthetic(shape: tuple[int, int, int], n: int = 240, classes: int = 3, seed: int = 0) -> Splits:
    """Images whose class shifts their mean: learnable, any shape."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.random((n, *shape), dtype=np.float32) * 0.5 + (y / classes)[:, None, None, None].astype(np.float32) * 0.5
    return make_splits(x, y.astype(np.int64), 0.2, 0.2, seed)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_yaml(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(yaml.safe_dump({"train": cfg.to_dict()}))
    return path


# ---- pieces ---------------------------------------------------------------------------------------------------


def test_baseline_eval_does_not_move_batchnorm_stats() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_digits_splits(0.15, 0.15, seed=0)
    loss, acc = evaluate(model, data.val, torch.device("cpu"))
    assert math.isfinite(loss) and 0 <= acc <= 1
    assert model.training, "evaluate must hand the model back in training mode"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved during the baseline evaluation"
    # The same forward in training mode would have moved them: the test can tell.
    model(data.val.x[:64])
    assert not torch.equal(model.state_dict()["trunk.1.running_mean"], before["trunk.1.running_mean"])


def test_batchnorm_batch_of_one_policy() -> None:
    assert batch_bounds(65, 32, drop_single=True) == [(0, 32), (32, 64)]
    assert batch_bounds(65, 32, drop_single=False) == [(0, 32), (32, 64), (64, 65)]
    assert batch_bounds(66, 32, drop_single=True)[-1] == (64, 66)
    with pytest.raises(ValueError, match="single sample"):
        TrainConfig(batch_size=1)
    TrainConfig(batch_size=1, model=ModelSection(args={"norm": "group"}))  # no BatchNorm, no problem


def test_trailing_batch_of_one_is_dropped_in_a_real_run(tmp_path: Path) -> None:
    data = synthetic((1, 8, 8), n=270)  # 162 training images = 5 x 32 + 2 ... pick a batch size leaving one
    n = len(data.train)
    batch = next(b for b in range(16, 64) if n % b == 1)
    run_dir = train(tiny(tmp_path, batch_size=batch, epochs=1), data=data)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations_per_epoch"] == math.ceil(n / batch) - 1


def test_three_channel_images_and_small_batch_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = synthetic((3, 12, 10))
    with caplog.at_level("WARNING", logger="gradserve.train"):
        run_dir = train(tiny(tmp_path, batch_size=8, epochs=2), data=data)
    assert any("noisy" in r.message and "group" in r.message for r in caplog.records)
    ckpt = checkpoint.load(checkpoint.last_path(run_dir))
    assert ckpt["data"]["shape"] == [3, 12, 10]
    model = ModelSpec.from_dict(ckpt["model_config"]).build()
    model.load_state_dict(ckpt["state_dict"])
    assert model.eval()(torch.rand(5, 3, 12, 10)).shape == (5, 3)  # (B, num_classes)


def test_monitor_norm_clip_and_flags() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16)))
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    norm = global_grad_norm(grads)
    expected = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    clip_grads_(grads, norm, max_norm=0.5 * norm.item())
    assert global_grad_norm(grads).item() == pytest.approx(0.5 * norm.item(), rel=1e-4)

    monitor = GradNormMonitor(explosion_factor=10, vanishing_floor=1e-6, window=50)
    for _ in range(20):
        assert monitor.observe(1.0, 0.5).finite
    assert monitor.observe(11.0, 0.5).exploding
    assert monitor.observe(1e-8, 0.5).vanishing
    assert not monitor.observe(math.nan, 0.5).finite
    assert not monitor.observe(1.0, math.inf).finite
    assert (monitor.nonfinite_total, monitor.nonfinite_in_row) == (2, 2)
    monitor.observe(1.0, 0.5)
    assert (monitor.nonfinite_total, monitor.nonfinite_in_row, monitor.exploding_total) == (2, 0, 1)


def test_lr_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=0.01, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 100) == pytest.approx(0.001)
    assert lr_at(cfg, 9, 100) == pytest.approx(0.01)
    assert lr_at(cfg, 10, 100) == pytest.approx(0.01)
    assert lr_at(cfg, 100, 100) == pytest.approx(0.001)
    assert all(lr_at(cfg, i, 100) >= lr_at(cfg, i + 1, 100) for i in range(10, 100))


def test_config_file_and_flags(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(ROOT / "gradserve.yaml")]))
    assert cfg.name == "digits" and cfg.selection.loss_ratio == 0.95
    args = parser.parse_args(
        [
            "--config",
            str(ROOT / "gradserve.yaml"),
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--lr",
            "0.1",
            "--seed",
            "7",
            "--norm",
            "group",
            "--name",
            "x",
            "--runs-dir",
            "r",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, cfg.model.args["norm"], cfg.name, cfg.runs_dir) == (
        3,
        16,
        0.1,
        7,
        "group",
        "x",
        "r",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(UsageError, match="epoch"):  # the command's edge turns it into exit code 2
        config_from_args(parser.parse_args(["--config", str(bad)]))


# ---- non-finite steps -----------------------------------------------------------------------------------------


def with_nan_images(data: Splits, every: int) -> Splits:
    x = data.train.x.clone()
    x[::every] = math.nan
    return replace(data, train=Split(x, data.train.y))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    data = with_nan_images(synthetic((1, 8, 8), n=400), every=40)  # a few batches carry a NaN image
    run_dir = train(tiny(tmp_path, epochs=2, batch_size=16), data=data)
    iters = [m for m in read_metrics(run_dir) if m["kind"] == "iter"]
    skipped = [m for m in iters if m["skipped"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 < len(skipped) < len(iters)
    assert summary["nonfinite_steps"] == len(skipped)
    assert summary["steps"] == len(iters) - len(skipped)
    ckpt = checkpoint.load(checkpoint.last_path(run_dir))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    selection = json.loads((run_dir / "selection.json").read_text())
    assert all(math.isfinite(r["grad_norm"]) for r in selection["records"])  # skipped norms left out of the mean


def test_too_many_nonfinite_in_a_row_stop_with_a_clear_error(tmp_path: Path) -> None:
    data = with_nan_images(synthetic((1, 8, 8)), every=1)
    with pytest.raises(NonFiniteError, match="3 iterations in a row"):
        train(tiny(tmp_path, max_nonfinite_in_row=3), data=data)


# ---- a real run, its artifacts, and `gradserve select` -----------------------------------------------------------


def test_short_run_writes_every_artifact(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, epochs=3, eval_every=15)
    run_dir = train(cfg)
    metrics = read_metrics(run_dir)
    iters = [m for m in metrics if m["kind"] == "iter"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["iteration"] for m in iters] == list(range(1, len(iters) + 1))
    assert {"loss", "grad_norm", "lr", "skipped", "exploding", "vanishing"} <= set(iters[0])

    doc = json.loads((run_dir / "selection.json").read_text())
    assert set(doc) >= {"selection", "rule", "baseline_loss", "records", "checkpoints"}
    assert len(doc["records"]) == len(doc["checkpoints"]) == len(evals) == math.ceil(len(iters) / 15)
    records = [Record(**r) for r in doc["records"]]
    redone = select_checkpoint(records, doc["baseline_loss"])
    assert redone.index == doc["selection"]["index"] and list(redone.eligible) == doc["selection"]["eligible"]
    for rel, record in zip(doc["checkpoints"], records, strict=True):
        ckpt = torch.load(run_dir / rel, weights_only=True)
        assert {
            "format_version",
            "model_config",
            "state_dict",
            "optimizer",
            "scheduler",
            "step",
            "epoch",
            "rng",
            "record",
            "config",
            "data",
        } <= set(ckpt)
        assert ckpt["step"] == record.step and ckpt["record"]["val_loss"] == record.val_loss
        assert ckpt["data"]["labels"] == [str(k) for k in range(10)] and ckpt["data"]["scale"] == 1 / 16
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("selected", "last", "best_val"):
        assert 0 <= summary[key]["test_accuracy"] <= 1 and math.isfinite(summary[key]["test_loss"])
    assert summary["diagnosis"]["verdict"] in ("underfitting", "overfitting", "good fit")
    assert "train_accuracy" in summary["diagnosis"] and summary["stop_reason"]

    # `gradserve select` redoes the choice with another rule, without retraining.
    assert gradserve_main(["select", "--run", str(run_dir), "--strategy", "first", "--loss-ratio", "1.0"]) == 0
    again = json.loads((run_dir / "selection.json").read_text())
    assert again["rule"]["strategy"] == "first" and again["rule"]["loss_ratio"] == 1.0
    assert again["records"] == doc["records"]


def test_early_stopping_records_its_reason(tmp_path: Path) -> None:
    run_dir = train(tiny(tmp_path, epochs=30, lr=0.0, warmup_steps=1, patience=2), data=synthetic((1, 8, 8)))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping") and summary["iterations"] < 30 * 4


# ---- real processes: SIGKILL + resume, DDP on gloo --------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, epochs=30, batch_size=64, eval_every=30, patience=None)
    config = write_yaml(tmp_path / "gradserve.yaml", cfg)
    run_dir = Path(cfg.runs_dir) / cfg.name
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cli("--config", str(config)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.exists() and path.read_text().count('"kind": "eval"') >= 3:
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        assert proc.poll() is None, "training finished before it could be killed: make the run longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_at = checkpoint.load(checkpoint.last_path(run_dir))["resume"]["iteration"]
    assert killed_at < 30 * math.ceil(1257 / 64)

    done = subprocess.run(
        cli("--config", str(config), "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from {checkpoint.last_path(run_dir)} at iteration {killed_at}" in done.stdout

    reference = train(replace(cfg, runs_dir=str(tmp_path / "reference")))
    resumed_ckpt = checkpoint.load(checkpoint.last_path(run_dir))
    reference_ckpt = checkpoint.load(checkpoint.last_path(reference))
    for key, value in reference_ckpt["state_dict"].items():
        assert torch.equal(resumed_ckpt["state_dict"][key], value), key
    assert json.loads((run_dir / "selection.json").read_text()) == json.loads(
        (reference / "selection.json").read_text()
    )
    iterations = [m["iteration"] for m in read_metrics(run_dir) if m["kind"] == "iter"]
    assert iterations == list(range(1, len(iterations) + 1)), "metrics.jsonl must hold each iteration once"


def test_ddp_two_processes_on_gloo(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, epochs=2, eval_every=8, sync_bn=True, threads=None)
    config = write_yaml(tmp_path / "gradserve.yaml", cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gradserve.cli", "train", "--config", str(config), "--nproc", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "sync_bn: SyncBatchNorm needs CUDA" in out  # the documented CPU/gloo policy

    run_dir = Path(cfg.runs_dir) / cfg.name
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert evals
    for m in evals:
        assert len(m["grad_norm_by_rank"]) == 2
        assert m["grad_norm_by_rank"][0] == pytest.approx(m["grad_norm_by_rank"][1], rel=1e-6), m
    summary = json.loads((run_dir / "summary.json").read_text())
    per_rank = math.ceil(1257 / 2)
    assert summary["processes"] == 2 and summary["iterations_per_epoch"] == math.ceil(per_rank / 32)
    # Rank 0 alone writes: one line per iteration (not two), one checkpoint per record, nothing else.
    iters = [m for m in metrics if m["kind"] == "iter"]
    assert [m["iteration"] for m in iters] == list(range(1, summary["iterations"] + 1))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(["last.pt", *(f"step-{m['step']}.pt" for m in evals)])
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["checkpoints", "metrics.jsonl", "report.png", "selection.json", "summary.json"]
    )
