"""The real stack for front-door tests: a run trained once, packaged by `gradserve package`, and
`gradserve serve` as a subprocess on free ports (TorchServe is its child), started by bench/stacks.py.

This module imports no protobuf stubs, so both our tests and the tritonclient tests (tests/client/, run in
their own pytest process: the two sets of `inference` protos cannot share one) can use it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from common import ROOT, free_port
from run_fixtures import digits, make_run, selected_model

from bench import stacks
from bench.stacks import GRADSERVE, FrontDoor

TOKEN = "test-token-7f3a"


@dataclass(frozen=True)
class Store:
    run: Path
    path: Path


_STORE: dict[str, Store] = {}


def built_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A model store with digits.mar, packaged by the CLI from a small real run; built once per session."""
    if "store" not in _STORE:
        base = tmp_path_factory.mktemp("frontdoor")
        run = make_run(base / "runs")
        subprocess.run([str(GRADSERVE), "package", "--run", str(run), "--model-store", str(base / "store")],
                       check=True, cwd=ROOT, capture_output=True, timeout=300)
        _STORE["store"] = Store(run, base / "store")
    return _STORE["store"]


@contextmanager
def running_front_door(store: Path, workdir: Path, token: str | None = TOKEN, *extra: str,
                       ready_timeout: float = 180.0) -> Iterator[FrontDoor]:
    """`gradserve serve` on free ports with `token` (bench/stacks.py, shared with the bench)."""
    with stacks.running_front_door(store, workdir, token, *extra, ready_timeout=ready_timeout) as door:
        yield door


__all__ = ["GRADSERVE", "ROOT", "TOKEN", "FrontDoor", "Store", "built_store", "digits", "free_port",
           "running_front_door", "selected_model"]
