"""What a training run is built from before its first iteration: `setup` returns a `Run` (device, data, model,
optimizer, GradScaler, gradient-norm monitor, the iteration arithmetic), the same on every rank."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gradserve.errors import UsageError
from handlers.factory import FactoryError, ModelSpec, forget_foreign
from training.config import TrainConfig
from training.data import Splits, batch_bounds
from training.datasets import load_splits
from training.distributed import Dist
from training.monitor import GradNormMonitor
from training.objective import Objective

log = logging.getLogger("gradserve.train")

BN_MIN_BATCH = 16  # below this, BatchNorm's batch statistics are noisy enough to warn about


@dataclass(frozen=True)
class Run:
    """The parts of a run. The model, optimizer, scaler, monitor and objective change in place as it trains;
    what the loop itself carries is in TrainState."""

    cfg: TrainConfig
    dist: Dist
    objective: Objective
    device: torch.device
    data: Splits
    model_spec: ModelSpec  # rebuilds the model (handlers/factory.py), in training and in the archive
    model: nn.Module  # the bare model: what evaluations and checkpoints see
    trained: nn.Module  # what the forward runs through: the model, or its DDP wrapper once `distribute`d
    params: list[nn.Parameter]  # those with a gradient, in the model's order
    buffers: list[torch.Tensor]  # BatchNorm's running statistics, put back when a step is skipped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # float16 on CUDA only
    monitor: GradNormMonitor
    bounds: list[tuple[int, int]]  # (start, stop) of each batch of an epoch, within this rank's shard
    eval_every: int
    say: Callable[[str], None]  # a line for people, from rank 0 (beside the progress bar)

    @property
    def use_amp(self) -> bool:
        return self.scaler is not None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runs_dir) / self.cfg.name

    @property
    def iters_per_epoch(self) -> int:
        return len(self.bounds)

    @property
    def total(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch


def setup(cfg: TrainConfig, data: Splits | None, dist: Dist, objective: Objective) -> Run:
    """Device, data (the config's dataset unless given), model, optimizer, AMP and the iteration arithmetic."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg, dist)
    put_code_on_path(cfg.code_dir, cfg.model.factory, cfg.data.factory)
    data = data or load_splits(cfg)
    model_spec, model = model_for(cfg, data, dist, objective, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"  # TrainConfig refuses amp with a multitask section
    if cfg.amp and not use_amp:
        log.warning("amp: mixed precision is used on CUDA only; training in float32 on %s", device)
    # Every rank walks its shard of the same seeded shuffle, a trailing batch of one left out for BatchNorm.
    per_rank = math.ceil(len(data.train) / dist.world)
    bounds = batch_bounds(per_rank, cfg.batch_size, drop_single=has_batchnorm(model))
    run = Run(
        cfg=cfg,
        dist=dist,
        objective=objective,
        device=device,
        data=data,
        model_spec=model_spec,
        model=model,
        trained=model,
        params=[p for p in model.parameters() if p.requires_grad],
        buffers=list(model.buffers()),
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if use_amp else None,
        monitor=GradNormMonitor(cfg.explosion_factor, cfg.vanishing_floor, cfg.median_window),
        bounds=bounds,
        eval_every=cfg.eval_every or len(bounds),
        say=tqdm.write if dist.is_main else (lambda _msg: None),
    )
    run.say(plan(run, per_rank))
    if intro := objective.describe():
        run.say(intro)
    return run


def pick_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but CUDA is not available; use device: auto or cpu")
    return torch.device("cuda", dist.local_rank)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def put_code_on_path(code_dir: str | None, *factories: str | None) -> None:
    """The user's code folder first on sys.path, for their model and data factories (it stays there: what was
    imported from it must stay importable for the rest of the run). A module of the same name imported earlier
    from elsewhere (another user folder, in a process that trains several) is forgotten, so that this folder's
    is the one imported."""
    if not code_dir:
        return
    if str(code_dir) in sys.path:
        sys.path.remove(str(code_dir))
    sys.path.insert(0, str(code_dir))
    forget_foreign(factories, Path(code_dir))


def model_for(
    cfg: TrainConfig, data: Splits, dist: Dist, objective: Objective, device: torch.device
) -> tuple[ModelSpec, nn.Module]:
    """The model the config's factory builds for the data's shape (with the objective's extra heads), checked
    with one batch of that shape, on its device."""
    args = {**cfg.model.args, **({"extra_heads": objective.extra_heads()} if objective.extra_heads() else {})}
    spec = ModelSpec(cfg.model.factory, data.shape, data.outputs, args)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    try:
        model: nn.Module = spec.build().to(device)
    except FactoryError as e:
        raise UsageError(f"model.factory: {e}") from None
    check_forward(model, data, spec, device)
    objective.start(model, device, data)
    uses_bn = has_batchnorm(model)
    if uses_bn and cfg.batch_size < 2:
        raise UsageError("batch_size 1 hands BatchNorm a single sample: use batch_size >= 2 or a model without "
                         "BatchNorm (e.g. GroupNorm or LayerNorm)")
    if uses_bn and cfg.batch_size < BN_MIN_BATCH:
        log.warning(
            "BatchNorm with batch_size %d (< %d): its batch statistics will be noisy; "
            "consider model.args.norm: group or layer (or GroupNorm/LayerNorm in your model)",
            cfg.batch_size,
            BN_MIN_BATCH,
        )
    if cfg.sync_bn and dist.enabled and uses_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("sync_bn: SyncBatchNorm needs CUDA; on CPU/gloo each rank keeps its own BatchNorm statistics")
    return spec, model


def check_forward(model: nn.Module, data: Splits, spec: ModelSpec, device: torch.device) -> None:
    """One eval-mode forward of two training rows before the first iteration: a model that rejects the data's
    shape, or answers with the wrong width, stops the run here with both shapes named."""
    x = data.train.x[:2].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises
        raise UsageError(f"model {spec.factory!r} rejected inputs of shape {list(x.shape)} (in_shape "
                         f"{list(spec.in_shape)}): {type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != spec.num_classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        width = "classes" if data.task == "classification" else "targets"
        raise UsageError(f"model {spec.factory!r} answered inputs of shape {list(x.shape)} with {got}; it must "
                         f"return [batch, {spec.num_classes}] ({spec.num_classes} {width})")


def plan(run: Run, per_rank: int) -> str:
    """The data and the iteration arithmetic, for the start of the run."""
    cfg, data = run.cfg, run.data
    full = math.ceil(per_rank / cfg.batch_size)
    dropped = " - 1 (a trailing batch of one is dropped for BatchNorm)" if run.iters_per_epoch < full else ""
    what = "images" if len(data.shape) == 3 else "rows"
    return (
        f"train {len(data.train)} / val {len(data.val)} / test {len(data.test)} {what} of "
        f"{'x'.join(map(str, data.shape))}, "
        f"{run.dist.world} process(es), device {run.device}\n"
        f"iterations per epoch = ceil({per_rank} / {cfg.batch_size}) = {full}{dropped}; "
        f"total = {cfg.epochs} epochs x {run.iters_per_epoch} = {run.total} iterations; "
        f"evaluating every {run.eval_every}"
    )


def distribute(run: Run) -> Run:
    """Under DDP, once rank 0 has cleared the run directory: the run with its model wrapped for DDP."""
    if not run.dist.enabled:
        return run
    torch_dist.barrier()  # rank 0 has cleared the run directory before anyone trains
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return dataclasses.replace(run, trained=DistributedDataParallel(run.model, device_ids=device_ids))
