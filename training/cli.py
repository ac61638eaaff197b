"""`gradserve train --config gradserve.yaml [flags]`: flags override the file's `train:` section.

`--nproc N` starts N local processes that train with DDP (gloo on CPU, NCCL on CUDA). The module also runs
under torchrun: `torchrun --standalone --nproc_per_node=2 -m training.cli --config gradserve.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from gradserve.net import free_port
from training import distributed
from training.config import TrainConfig
from training.distributed import Dist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="gradserve.yaml", help="YAML file with a train: section")
    parser.add_argument("--name", help="run name: writes runs_dir/<name>/")
    parser.add_argument("--runs-dir", dest="runs_dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--norm", choices=("batch", "group", "layer"), help="model.args.norm of the built-in ConvNet")
    parser.add_argument("--eval-every", dest="eval_every", type=int, help="iterations between evaluations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--resume", action="store_true", help="continue runs_dir/<name>/checkpoints/last.pt")
    parser.add_argument("--nproc", type=int, default=1, help="local DDP processes (gloo on CPU)")
    parser.add_argument("--method", choices=("gradnorm", "equal"), help="multitask.method (multi-task configs)")
    parser.add_argument("--compare", action="store_true",
                        help="multi-task: train with equal weights and with GradNorm on the same seed and data, "
                        "then compare them (runs_dir/<name>-comparison/)")


FLAGS = ("name", "runs_dir", "epochs", "batch_size", "lr", "seed", "eval_every", "device", "threads", "sync_bn",
         "progress")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in FLAGS}
    overrides["model.args.norm"] = args.norm
    if getattr(args, "method", None):
        if not (gradserve_config.load_file(args.config).get("train") or {}).get("multitask"):
            raise UsageError(f"{args.config}: --method needs a multitask: section in train:")
        overrides["multitask.method"] = args.method
    cfg = gradserve_config.load(TrainConfig, args.config, "train", overrides)
    if cfg.code_dir is None:  # the user's factories live beside their config
        cfg = dataclasses.replace(cfg, code_dir=str(Path(args.config).resolve().parent))
    return cfg


def run(cfg: TrainConfig, dist: Dist, resume: bool) -> None:
    from training.train import train  # heavy imports only once the config is known to be valid

    distributed.init(dist, cfg.device)
    try:
        train(cfg, dist=dist, resume=resume)
    finally:
        distributed.close(dist)


def spawned(rank: int, cfg: TrainConfig, world: int, port: int, resume: bool) -> None:
    """One of --nproc processes: the same environment torchrun would give it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    run(cfg, distributed.from_env(), resume)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    dist = distributed.from_env()
    if getattr(args, "compare", False):
        from training.multitask.compare import compare

        compare(cfg)
        return 0
    if cfg.multitask is not None and (args.nproc > 1 or dist.enabled):
        raise UsageError("multitask training runs in one process; drop --nproc / torchrun")
    if args.nproc > 1 and not dist.enabled:
        # Share the cores between processes unless told otherwise (torchrun does the same with OMP_NUM_THREADS=1).
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // args.nproc)
        cfg = dataclasses.replace(cfg, threads=threads)
        mp.spawn(spawned, args=(cfg, args.nproc, free_port(), args.resume), nprocs=args.nproc, join=True)
        return 0
    run(cfg, dist, args.resume)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m training.cli", description="train with gradient-norm monitoring")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
