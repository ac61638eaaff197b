"""`make study`: the studies of a suite file, each in its own interpreter (two examples' `net` modules must not
meet in one process), and their table: <out>/<study>/study.{json,md,png}, <out>/suite.{md,json,png}.

    seeds: 5                                 # every study's, unless it says otherwise
    studies:
      - name: digits-noisy                   # its folder under <out>
        label: digits, 20% noisy labels      # how tables call it
        config: ../../gradserve.yaml         # relative to the suite file
        set: {name: digits-noisy, data.label_noise: 0.2}   # train: overrides (dotted keys)
        prepare: make_data.py                # run beside the config when its data.path is missing
        seeds: 3
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gradserve.errors import UsageError
from training.study.markdown import suite_markdown
from training.study.plot import write_suite_plot

ENTRY_KEYS = {"name", "label", "config", "set", "prepare", "seeds", "patience"}


def read_suite(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"suite file {path} does not exist")
    suite = yaml.safe_load(path.read_text()) or {}
    studies = suite.get("studies") or []
    if not studies:
        raise UsageError(f"{path}: no studies: list them under `studies:` (name, config, ...)")
    for entry in studies:
        if not isinstance(entry, dict) or not {"name", "config"} <= set(entry) or set(entry) - ENTRY_KEYS:
            raise UsageError(f"{path}: every study needs name and config, and takes only {sorted(ENTRY_KEYS)}; "
                             f"got {entry!r}")
    return suite


def prepare(entry: dict[str, Any], config: Path) -> None:
    """Make the study's data when its config's data.path is missing (the examples build theirs from scikit-learn)."""
    from training.study.study import load_config

    cfg = load_config(str(config), entry.get("set") or {})
    if entry.get("prepare") and cfg.data.path and not Path(cfg.data.path).exists():
        print(f"  {entry['name']}: {cfg.data.path} is missing: running {entry['prepare']}", flush=True)
        subprocess.run([sys.executable, entry["prepare"]], cwd=config.parent, check=True)


def study_command(entry: dict[str, Any], config: Path, seeds: int, out: Path, progress: bool,
                  fresh: bool) -> list[str]:
    command = [sys.executable, "-m", "gradserve.cli", "study", "--config", str(config), "--seeds", str(seeds),
               "--out", str(out), "--label", str(entry.get("label", entry["name"]))]
    for key, value in (entry.get("set") or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: the study reads the value back as is
    command += ["--patience", str(entry["patience"])] if entry.get("patience") else []
    return command + ([] if progress else ["--no-progress"]) + (["--fresh"] if fresh else [])


def run_suite(path: Path, out: Path | None, progress: bool, fresh: bool) -> Path:
    suite = read_suite(path)
    out = out or path.parent
    started = time.perf_counter()
    docs = []
    studies = suite["studies"]
    for n, entry in enumerate(studies, start=1):
        config = (path.parent / entry["config"]).resolve()
        seeds = int(entry.get("seeds", suite.get("seeds", 5)))
        print(f"[{n}/{len(studies)}] {entry['name']}: {seeds} seed(s) of {config} "
              f"({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
        prepare(entry, config)
        folder = out / entry["name"]
        done = subprocess.run(study_command(entry, config, seeds, folder, progress, fresh))
        if done.returncode != 0:
            raise UsageError(f"the study {entry['name']} failed (exit {done.returncode}); its finished runs are "
                             "reused when the suite runs again")
        docs.append(json.loads((folder / "study.json").read_text()))
    minutes = (time.perf_counter() - started) / 60
    table = suite_markdown(docs, minutes)
    links = "\n".join(f"- [{d['label']}]({e['name']}/study.md)" for d, e in zip(docs, studies, strict=True))
    (out / "suite.md").write_text(f"# The checkpoint rule, measured: `make study`\n\n{table}\n{links}\n")
    (out / "suite.json").write_text(json.dumps({"minutes": minutes, "studies": [e["name"] for e in studies]},
                                               indent=1) + "\n")
    write_suite_plot(docs, out / "suite.png")
    print(table)
    print(f"wrote {out}/suite.md, suite.json, suite.png and a folder per study ({minutes:.1f} min)")
    return out
