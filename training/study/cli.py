"""`gradserve study --config gradserve.yaml --seeds 5`: the checkpoint rule against best-validation, the last
checkpoint and the hindsight oracle on the config's own data (training/study/__init__.py); `--suite FILE` runs
several studies and their table (`make study`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from gradserve.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="gradserve.yaml", help="YAML file with a train: section")
    parser.add_argument("--seeds", type=int, default=5, help="train seeds 0..N-1 (default 5)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--name", help="override train.name: the runs go to runs_dir/<name>-study/seed-<k>/")
    parser.add_argument("--runs-dir", dest="runs_dir", help="override train.runs_dir")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train: setting (dotted key, YAML value), e.g. data.label_noise=0.2")
    parser.add_argument("--patience", type=int,
                        help="early stopping's patience in the 'on' variant (default: the config's, or 8)")
    parser.add_argument("--out", help="folder for study.json/md/png (default: runs_dir/<name>-study/); with "
                        "--suite, for the suite's studies and table (default: the suite file's folder)")
    parser.add_argument("--label", help="the study's name in its outputs (default: the run name)")
    parser.add_argument("--fresh", action="store_true", help="retrain every seed, even finished runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars")
    parser.add_argument("--suite", help="a suite file (docs/study/suite.yaml): run its studies, write their table")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {setting!r}: write KEY=VALUE, e.g. --set data.label_noise=0.2")
        found[key.strip()] = yaml.safe_load(value)
    for key in ("epochs", "name", "runs_dir"):
        if getattr(args, key) is not None:
            found[key] = getattr(args, key)
    return found


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.seeds < 1 or (args.patience is not None and args.patience < 1):
        raise UsageError("--seeds and --patience must be >= 1")
    if args.suite:
        from training.study.suite import run_suite

        run_suite(Path(args.suite), Path(args.out) if args.out else None, args.progress, args.fresh)
        return 0
    if not Path(args.config).exists():
        raise UsageError(f"config file {args.config} does not exist; pass --config with the path of gradserve.yaml")
    from training.study.markdown import suite_markdown
    from training.study.study import StudySpec, run_study

    spec = StudySpec(config=args.config, seeds=tuple(range(args.seeds)), overrides=overrides(args),
                     patience=args.patience, out=args.out, progress=args.progress, fresh=args.fresh,
                     label=args.label or "")
    out = run_study(spec)
    doc = json.loads((out / "study.json").read_text())
    print(suite_markdown([doc], doc["timing"]["study_s"] / 60))
    print(f"the whole story, per seed and variant: {out / 'study.md'}")
    return 0
