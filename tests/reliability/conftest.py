"""Fixtures of the reliability suite: one front door on the real stack, serving the demo model `digits` and
`slow` (the same archive with a handler that sleeps, built by torch-model-archiver in the test), the mode
(short in `make test`, long under GRADSERVE_RELIABILITY=long) and the results JSON each scenario writes."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, built_store, running_front_door, selected_model

LONG = os.environ.get("GRADSERVE_RELIABILITY", "short") == "long"
MODE = "long" if LONG else "short"
RESULTS = Path(os.environ.get("GRADSERVE_RELIABILITY_RESULTS", Path(__file__).parent / "results")) / MODE

MiB = 1024 * 1024
MAX_MESSAGE = MiB  # small, so that "oversized" messages are cheap to send
MAX_IN_FLIGHT = 48  # above the soak's concurrency of 32, below the full-queue burst
TOKEN_LIFETIME_MIN = 0.25  # TorchServe's keys live 15 s: every scenario runs across key renewals
SLOW_SLEEP_S = 1.0

SLOW_HANDLER = f'''"""Test-only handler: the production handler, answering {SLOW_SLEEP_S} s late (a model slower than
the deadline)."""
import time

from handler import GradserveHandler


class SlowHandler(GradserveHandler):
    def inference(self, data, *args, **kwargs):
        time.sleep({SLOW_SLEEP_S})
        return super().inference(data, *args, **kwargs)
'''

def scaled(short: float, long: float) -> float:
    return long if LONG else short


def archive_variant(source: Path, store: Path, name: str, slow: bool = False, alter_weights: bool = False) -> Path:
    """A copy of the archive `source` registered as `name`, rebuilt by torch-model-archiver: with the slow
    handler, or with weights.pt altered after the manifest recorded its sha256."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    with tempfile.TemporaryDirectory(prefix="gradserve-variant-") as tmp:
        unpacked, extra = Path(tmp) / "unpacked", Path(tmp) / "extra"
        with zipfile.ZipFile(source) as z:
            z.extractall(unpacked)
        manifest = json.loads((unpacked / "gradserve.json").read_text())
        manifest["name"] = name
        extra.mkdir()
        (extra / "gradserve.json").write_text(json.dumps(manifest))
        for package in ("handlers", "training"):
            (unpacked / package).rename(extra / package)
        handler = unpacked / "handler.py"
        if slow:
            (unpacked / "handler.py").rename(extra / "handler.py")
            handler = Path(tmp) / "slow_handler.py"
            handler.write_text(SLOW_HANDLER)
        weights = unpacked / "weights.pt"
        if alter_weights:
            blob = bytearray(weights.read_bytes())
            blob[-200] ^= 0x01  # one bit of the data: still a loadable file, no longer the packaged one
            weights.write_bytes(bytes(blob))
        generate_model_archive(ModelArchiverConfig(
            model_name=name, version=manifest["version"], handler=str(handler), serialized_file=str(weights),
            extra_files=str(extra), config_file=str(unpacked / "model-config.yaml"), export_path=str(store),
            force=True))
    return store / f"{name}.mar"


@pytest.fixture(scope="package")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.mar as `gradserve package` built it, and slow.mar."""
    built = built_store(tmp_path_factory)
    store = tmp_path_factory.mktemp("reliability-store")
    (store / "digits.mar").write_bytes((built.path / "digits.mar").read_bytes())
    archive_variant(built.path / "digits.mar", store, "slow", slow=True)
    return store


@pytest.fixture(scope="package")
def reference(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The training code's own model of the packaged checkpoint."""
    return selected_model(built_store(tmp_path_factory).run)


@pytest.fixture(scope="package")
def door(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    with running_front_door(store, tmp_path_factory.mktemp("reliability-door"), TOKEN,
                            "--token-expiration-min", str(TOKEN_LIFETIME_MIN),
                            "--max-message-bytes", str(MAX_MESSAGE), "--max-in-flight", str(MAX_IN_FLIGHT)) as running:
        yield running


@pytest.fixture(scope="package")
def record() -> Callable[[str, dict[str, Any]], None]:
    """record(scenario, figures): write RESULTS/<scenario>.json (read by tests/reliability/report.py)."""
    def write(scenario: str, figures: dict[str, Any]) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{scenario}.json"
        path.write_text(json.dumps({"scenario": scenario, "mode": MODE, **figures}, indent=2) + "\n")

    return write
