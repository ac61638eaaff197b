"""One study: a config trained once per seed, every strategy scored on every run, study.{json,md,png} written.

    run_study(StudySpec(config="gradserve.yaml", seeds=(0, 1, 2, 3, 4)))  # -> the folder it wrote to
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradserve import config as gradserve_config
from training.config import TrainConfig
from training.study.analysis import analyse, curve
from training.study.markdown import study_markdown
from training.study.plot import write_study_plot
from training.study.runs import ensure_run, read_run, seed_config

DEFAULT_PATIENCE = TrainConfig.patience or 8  # early stopping's patience when the config has it off


@dataclass(frozen=True)
class StudySpec:
    config: str  # the gradserve.yaml whose train: section is studied
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted train: keys, e.g. {"epochs": 20}
    patience: int | None = None  # of the early-stopping variant; None: the config's, or DEFAULT_PATIENCE
    out: str | None = None  # where study.* go; None: runs_dir/<name>-study/
    progress: bool = True  # the training's progress bars
    fresh: bool = False  # retrain even where a finished run of the same config exists
    label: str = ""  # how progress lines name the study; default: the run name


def load_config(path: str, overrides: dict[str, Any]) -> TrainConfig:
    """The train: section with the overrides; the user's factories live beside the config (as `gradserve train`)."""
    cfg = gradserve_config.load(TrainConfig, path, "train", overrides)
    if cfg.code_dir is None:
        cfg = dataclasses.replace(cfg, code_dir=str(Path(path).resolve().parent))
    return cfg


def count_test_examples(cfg: TrainConfig) -> int:
    """Examples in the test split (the same for every seed: the fractions fix it)."""
    from training.datasets import load_splits
    from training.setup import put_code_on_path

    put_code_on_path(cfg.code_dir)
    return len(load_splits(cfg).test)


def run_study(spec: StudySpec) -> Path:
    cfg = load_config(spec.config, spec.overrides)
    patience = spec.patience or cfg.patience or DEFAULT_PATIENCE
    study_dir = Path(cfg.runs_dir) / f"{cfg.name}-study"
    out = Path(spec.out) if spec.out else study_dir
    label = spec.label or cfg.name
    print(f"study {label}: {len(spec.seeds)} seed(s) x {cfg.epochs} epochs with early stopping off, in {study_dir}/; "
          f"early stopping (patience {patience}) is each run cut where it would have stopped", flush=True)
    started = time.perf_counter()
    runs, metrics, seconds = [], None, []
    for n, seed in enumerate(spec.seeds, start=1):
        def say(line: str, n: int = n) -> None:
            print(f"  {label} seed {spec.seeds[n - 1]} ({n}/{len(spec.seeds)}): {line}", flush=True)

        run_dir, took = ensure_run(seed_config(cfg, study_dir, seed, spec.progress), spec.fresh, say)
        run, metrics = read_run(run_dir, seed)
        runs.append(run)
        seconds.append(took)
    assert metrics is not None
    n_test = count_test_examples(cfg)
    variants = analyse(runs, cfg.selection, patience, cfg.min_delta, metrics)
    doc = {
        "name": cfg.name, "label": label, "config": os.path.relpath(spec.config), "overrides": spec.overrides,
        "seeds": list(spec.seeds), "epochs": cfg.epochs, "task": "multitask" if cfg.multitask else cfg.task,
        "patience": patience, "min_delta": cfg.min_delta, "rule": dataclasses.asdict(cfg.selection),
        "n_test": n_test, "one_example": {m.name: 100 / n_test if m.unit in ("points", "%") else None
                                          for m in metrics},
        "metrics": [dataclasses.asdict(m) for m in metrics],
        "variants": variants, "curve": curve(runs[0], variants),
        "timing": {"training_s": seconds, "study_s": time.perf_counter() - started},
    }
    write_study(out, doc)
    return out


def write_study(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(finite(doc), indent=1) + "\n")
    text = study_markdown(doc)
    (out / "study.md").write_text(text)
    write_study_plot(doc, out / "study.png")
    print(f"  {doc['label']}: wrote {out}/study.json, study.md, study.png "
          f"({doc['timing']['study_s']:.0f} s, {sum(doc['timing']['training_s']):.0f} s of it training)", flush=True)


def finite(value: Any) -> Any:
    """The document with NaN and infinities as null: study.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
