"""Which models `gradserve bench` measures, where their runs are, how a missing one is trained, and the rows it
sends each of them (shaped by the archive's manifest).

    models = resolve(["digits", "resnet"], Path("gradserve.yaml"), run=None, runs_dir=None)
    for model in models:
        ensure_trained(model, epochs=None)      # make_data.py and `gradserve train` when the run is missing
    rows = sample_rows(Manifest.from_archive(archive), 256)

A name is the config's own model (the digits demo in this repository) or the `train.name` of an example in
examples/<folder>/gradserve.yaml: digits-rgb (images), resnet, cancer (tabular), diabetes (regression), wine.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from handlers.manifest import Manifest
from handlers.preprocess import Preprocess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GRADSERVE = Path(sys.executable).parent / "gradserve"


@dataclass(frozen=True)
class BenchModel:
    name: str  # the served model's name (train.name)
    config: Path | None  # the gradserve.yaml that trains it (None: the defaults, the digits demo)
    run: Path  # runs_dir/<name>, with selection.json once trained
    explicit: bool = False  # the run was named with --run: never trained here

    @property
    def folder(self) -> Path:
        return self.config.parent if self.config is not None else Path.cwd()


def examples() -> dict[str, Path]:
    """train.name -> the example's gradserve.yaml, for every folder of examples/ that has one."""
    from training.config import TrainConfig

    found = {}
    for path in sorted(EXAMPLES.glob("*/gradserve.yaml")):
        found[gradserve_config.load(TrainConfig, path, "train").name] = path
    return found


def resolve(names: list[str], config: Path | None, run: Path | None, runs_dir: Path | None) -> list[BenchModel]:
    """The models named, in order. `run` is the config's own model's run (default: its runs_dir/<name>);
    `runs_dir` puts every other model's run there instead of beside its example."""
    from training.config import TrainConfig

    own = gradserve_config.load(TrainConfig, config, "train")
    own_name = run.resolve().name if run is not None else own.name  # a run's folder is its model's name
    known = examples()
    models = []
    for name in names:
        if name == own_name:
            models.append(BenchModel(name, config, run or Path(own.runs_dir) / name, explicit=run is not None))
        elif name in known:
            where = runs_dir or Path(gradserve_config.load(TrainConfig, known[name], "train").runs_dir)
            models.append(BenchModel(name, known[name], where / name))
        else:
            raise UsageError(f"no model named {name!r} to bench: the config's own is {own_name!r}, the examples' "
                             f"are {', '.join(sorted(known))}")
    return models


def ensure_trained(model: BenchModel, epochs: int | None) -> None:
    """Train `model` with its own config when its run has no selection yet (its make_data.py first, when the
    example has one and its data is missing); `epochs` caps the config's epochs."""
    if (model.run / "selection.json").exists():
        return
    if model.explicit:
        raise UsageError(f"{model.run} is not a trained run; train one first (gradserve train) or pass --run")
    make_data = model.folder / "make_data.py"
    if model.config is not None and make_data.exists() and not _data_exists(model.config):
        print(f"{model.name}: writing its data ({make_data})", flush=True)
        subprocess.run([sys.executable, str(make_data)], cwd=model.folder, check=True, stdout=subprocess.DEVNULL)
    command = [str(GRADSERVE), "train", "--config", str(model.config or "/dev/null"), "--no-progress",
               "--runs-dir", str(model.run.parent), "--name", model.name]
    command += ["--epochs", str(epochs)] if epochs else []
    print(f"{model.name}: training ({' '.join(command[1:])})", flush=True)
    done = subprocess.run(command, cwd=model.folder, capture_output=True, text=True)
    if done.returncode != 0 or not (model.run / "selection.json").exists():
        raise UsageError(f"training {model.name} for the bench failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _data_exists(config: Path) -> bool:
    from training.config import TrainConfig

    data = gradserve_config.load(TrainConfig, config, "train").data
    return data.path is None or Path(data.path).exists()


def sample_rows(manifest: Manifest, count: int, seed: int = 0) -> np.ndarray:
    """`count` rows of the model's `input`, float32 [count, *row_shape], with few decimals (short in JSON):
    pixels in [0, 1] for an image model, raw feature values around the training split's mean for a table."""
    rng = np.random.default_rng(seed)
    shape = (count, *manifest.input.row_shape)
    preprocess = Preprocess.from_dict(manifest.preprocess) if manifest.preprocess else None
    if preprocess is not None and preprocess.kind == "table" and preprocess.mean:
        rows = np.asarray(preprocess.mean) + np.asarray(preprocess.std) * rng.standard_normal(shape)
    else:
        rows = rng.random(shape)
    return np.round(rows, 3).astype(np.float32)
