"""`gradserve package --run runs/<name>`: the selected checkpoint -> model_store/<name>.mar.

The archive (built by torch-model-archiver) holds the handler and what it imports (the handlers/ modules that
HANDLER_MODULES lists), the model's code (training/model.py for the built-in ConvNet, or the user's module or
package in its layout, training/model_code.py), the weights of the selected checkpoint only, model-config.yaml
and the gradserve.json manifest (ARCHITECTURE.md, "Archive"). Before it is written to the model store it is
proven to work in a clean interpreter (training/archive_check.py).

Versions: every build writes `<name>-<version>.mar`, which is never overwritten (unless --force), and
copies it to `<name>.mar`, the latest build. Both carry model name <name> and their version in
MAR-INF/MANIFEST.json, so TorchServe can load an older version beside the latest one by file name.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

import handlers.codec
from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from handlers.factory import ModelSpec
from handlers.manifest import FILE as MANIFEST_FILE
from handlers.manifest import Manifest, TensorSpec
from handlers.optimize import for_inference
from handlers.preprocess import Preprocess
from handlers.threads import PARALLEL_ROWS, Threads
from training.archive_check import check_archive
from training.forward_rows import fastest_rows
from training.model_code import sha256, stage_model_code, trained_code_dir


@dataclass(frozen=True)
class PackageConfig:
    version: str = "1.0"
    model_store: str = gradserve_config.path_field("model_store")
    # TorchServe batchSize: requests handed to one handle() call. 1: the front door groups concurrent requests
    # itself (serve.coalesce), and TorchServe's own batching would add its delay to every lone request. For
    # clients that call TorchServe directly, set e.g. 32 and 5 ms.
    batch_size: int = 1
    max_batch_delay_ms: int = 0     # TorchServe maxBatchDelay (with batch_size > 1; its 0 then means a long wait)
    # TorchServe workers `gradserve serve` runs the model on; each gets at most cores // max_workers torch threads.
    # 0 and 0: one worker per core of the machine that serves it (TorchServe's own default on CPUs).
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 30
    max_rows: int = 1024            # rows one request may carry
    # Torch threads of a worker for calls of parallel_rows rows or more (0: its share, cores // max_workers; capped
    # by it); smaller calls run on one thread. 1 suits small models, 0 heavy ones (handlers/threads.py says why).
    torch_threads: int = 1
    parallel_rows: int = PARALLEL_ROWS
    forward_rows: int | None = None  # rows the handler forwards at once; None: the fastest, measured here; 0: all
    # The handler serves the model's forward compiled for CPU inference (handlers/optimize.py: BatchNorm folded into
    # convolutions, oneDNN; ~3x on the images example's CNN), if it answers as the eager model does; else eager.
    optimize: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(self.version)):
            raise ValueError(f"version {self.version!r} must be letters, digits, '.', '_' or '-' (e.g. 1.0)")
        if self.batch_size > 1 and self.max_batch_delay_ms < 1:
            raise ValueError(f"batch_size {self.batch_size} needs max_batch_delay_ms >= 1: TorchServe reads 0 as "
                             "a long wait for a full batch")
        if (self.min_workers, self.max_workers) != (0, 0) and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} and max_workers {self.max_workers}: need "
                             "1 <= min_workers <= max_workers, or both 0 (one worker per core)")
        object.__setattr__(self, "version", str(self.version))


class PackageRefused(UsageError):
    """The run cannot be packaged as asked; the message says why and what to do."""


def package(run: Path, config: PackageConfig, allow_fallback: bool = False, force: bool = False) -> Path:
    """Build the archive of `run`'s selected checkpoint; returns the path of model_store/<name>.mar."""
    name = run.resolve().name
    selection_file = run / "selection.json"
    if not selection_file.exists():
        raise PackageRefused(f"{selection_file} does not exist: train the run first (gradserve train)")
    chosen = json.loads(selection_file.read_text())
    selection = chosen["selection"]
    if not selection["rule_satisfied"] and not allow_fallback:
        raise PackageRefused(
            f"the selection of {run} fell back ({selection['reason']}); the gradient-norm rule chose no "
            "checkpoint. Retrain, redo the choice with other rule parameters (gradserve select), "
            "or pass --allow-fallback to package the fallback anyway (the manifest will say so)")
    store = Path(config.model_store)
    versioned = store / f"{name}-{config.version}.mar"
    if versioned.exists() and not force:
        raise PackageRefused(f"{versioned} already exists and versions are not rebuilt: pass a new --version "
                             "(or --force to replace this one)")

    checkpoint_path = run / chosen["checkpoints"][selection["index"]]
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory(prefix="gradserve-package-") as tmp:
        stage, extra = Path(tmp), Path(tmp) / "extra"
        _stage_handlers(extra)
        spec = ModelSpec.from_dict(checkpoint["model_config"])
        code_dir = trained_code_dir(run, checkpoint["config"])
        code = stage_model_code(spec, code_dir, extra)
        weights = stage / "weights.pt"
        torch.save(checkpoint["state_dict"], weights)
        torchserve_config: dict[str, Any] = {
            "batchSize": config.batch_size, "maxBatchDelay": config.max_batch_delay_ms,
            "responseTimeout": config.response_timeout_s,
            "handler": {"torch_threads": config.torch_threads, "parallel_rows": config.parallel_rows,
                        "optimize": config.optimize}}
        if config.max_workers:  # without them: one worker per core where it is served
            torchserve_config.update(minWorkers=config.min_workers, maxWorkers=config.max_workers)
        rows = _forward_rows(config, spec, checkpoint, code_dir, Threads.from_config(torchserve_config).most)
        manifest = replace(_manifest(name, config, chosen, checkpoint, sha256(weights), allow_fallback, code),
                           forward_rows=rows)
        manifest.write(extra / MANIFEST_FILE)
        model_config = stage / "model-config.yaml"
        model_config.write_text(yaml.safe_dump(torchserve_config))
        built = _archive(name, config.version, stage, weights, model_config, extra)
        check_archive(built)  # refuses, saying why, an archive that would not load in TorchServe
        store.mkdir(parents=True, exist_ok=True)
        for target in (versioned, store / f"{name}.mar"):
            partial = target.with_name(f".{target.name}.partial")
            shutil.copyfile(built, partial)
            partial.replace(target)  # atomic: TorchServe never sees half an archive
    return store / f"{name}.mar"


def _forward_rows(config: PackageConfig, spec: ModelSpec, checkpoint: dict[str, Any], code_dir: str | None,
                  threads: int) -> int:
    """The configured chunk, or the fastest one for the trained model on this machine (training/forward_rows.py),
    on the threads a worker gives a big call."""
    if config.forward_rows is not None:
        return config.forward_rows
    from training.setup import put_code_on_path

    put_code_on_path(code_dir, spec.factory)
    model = spec.build()
    model.load_state_dict(checkpoint["state_dict"])
    forward = for_inference(model.eval(), spec.in_shape, torch.device("cpu"), config.optimize)[0]
    return fastest_rows(forward, spec.in_shape, threads, config.max_rows)


HANDLER_MODULES = ("__init__.py", "codec.py", "manifest.py", "factory.py", "preprocess.py", "threads.py",
                   "sharedmem.py", "optimize.py")


def _stage_handlers(extra: Path) -> None:
    """What the handler imports, in its package layout (the archive root is on sys.path)."""
    (extra / "handlers").mkdir(parents=True)
    source = Path(handlers.codec.__file__).parent
    for name in HANDLER_MODULES:
        shutil.copyfile(source / name, extra / "handlers" / name)


def _archive(name: str, version: str, stage: Path, weights: Path, model_config: Path, extra: Path) -> Path:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    out = stage / "out"
    out.mkdir()
    generate_model_archive(ModelArchiverConfig(
        model_name=name, version=version, handler=str(Path(handlers.codec.__file__).parent / "handler.py"),
        serialized_file=str(weights), extra_files=str(extra), config_file=str(model_config),
        export_path=str(out), force=True))
    return out / f"{name}.mar"


def _manifest(name: str, config: PackageConfig, chosen: dict[str, Any], checkpoint: dict[str, Any],
              weights_sha256: str, allow_fallback: bool, code: dict[str, str]) -> Manifest:
    spec = ModelSpec.from_dict(checkpoint["model_config"])
    data = checkpoint.get("data", {})
    task = data.get("task", "classification")
    kind = "image" if len(spec.in_shape) == 3 else "table"
    preprocess = Preprocess.from_dict(data["preprocess"]) if data.get("preprocess") else Preprocess(kind, spec.in_shape)
    k = spec.num_classes
    inputs = [TensorSpec("input", "FP32", (-1, *spec.in_shape))]
    if preprocess.kind == "image" and preprocess.mode:  # images as files, decoded as in training
        inputs.append(TensorSpec("image", "BYTES", (-1,)))
    if task == "regression":
        outputs = [TensorSpec("prediction", "FP32", (-1, k))]
    else:
        outputs = [TensorSpec("logits", "FP32", (-1, k)), TensorSpec("label", "INT64", (-1,)),
                   TensorSpec("probabilities", "FP32", (-1, k)), TensorSpec("class_name", "BYTES", (-1,)),
                   # a multi-task model: one more output per extra head, its raw values
                   *(TensorSpec(head, "FP32", (-1, size)) for head, size in spec.args.get("extra_heads", {}).items())]
    selection = chosen["selection"]
    return Manifest(
        name=name, version=config.version, inputs=tuple(inputs), outputs=tuple(outputs),
        labels=tuple(data.get("labels", [str(i) for i in range(k)])), max_rows=config.max_rows,
        input_scale=preprocess.describe(), task=task, preprocess=preprocess.to_dict(), code=code,
        selection={**selection, "record": chosen["records"][selection["index"]]},
        rule=chosen["rule"], baseline_loss=chosen["baseline_loss"],
        rule_satisfied=bool(selection["rule_satisfied"]), allow_fallback=allow_fallback,
        weights_file="weights.pt", weights_sha256=weights_sha256,
        model_config=spec.to_dict(), training_config=checkpoint.get("config", {}),
        source={"checkpoint": chosen["checkpoints"][selection["index"]], "step": checkpoint.get("step")},
        tasks=tuple(data.get("tasks", ())),  # multi-task: what each output predicts
        payload_refs=True,  # this handler maps large requests from shared memory
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/digits")
    parser.add_argument("--version", help="archive version (default: package.version of the config)")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="package even when the selection rule was not satisfied (the manifest says so)")
    parser.add_argument("--model-store", help="folder of the archives (default: package.model_store)")
    parser.add_argument("--force", action="store_true", help="replace an existing archive of the same version")
    parser.add_argument("--config", type=Path, help="gradserve.yaml (default: ./gradserve.yaml if present)")


def main(args: argparse.Namespace) -> int:
    config = gradserve_config.load(PackageConfig, gradserve_config.default_path(args.config), "package",
                                   {"version": args.version, "model_store": args.model_store})
    archive = package(args.run, config, allow_fallback=args.allow_fallback, force=args.force)
    print(f"wrote {archive} and {archive.with_name(f'{archive.stem}-{config.version}.mar')}")
    return 0
