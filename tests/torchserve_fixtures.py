"""Reusable pieces for tests that need a packaged model and a real TorchServe (Java) process.

    store = packaged_store(tmp_path_factory)                  # trains a small run once, packages digits.mar
    with running_torchserve(store, tmp_path / "ts") as ts:    # free ports, token auth on, model API off
        stub, metadata = predictions_stub(ts)

TorchServe is always stopped by PID (its process group) when the block ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from run_fixtures import make_run

from bench import stacks
from server.generated import torchserve_pb2_grpc
from server.torchserve.client import Keys
from server.torchserve.process import TorchServe
from training.package import PackageConfig, package

_STORES: dict[Path, Path] = {}


def packaged_store(tmp_path_factory: pytest.TempPathFactory, config: PackageConfig | None = None) -> Path:
    """A model store holding digits.mar (and digits-1.0.mar), built once per test session and config."""
    config = config or PackageConfig(batch_size=32, max_batch_delay_ms=20)  # TorchServe batches what it's sent
    key = tmp_path_factory.getbasetemp() / f"store-{abs(hash(config))}"
    if key not in _STORES:
        runs = tmp_path_factory.mktemp("runs")
        run = make_run(runs)
        package(run, replace(config, model_store=str(key)))
        _STORES[key] = key
    return key


@contextmanager
def running_torchserve(model_store: Path, workdir: Path, models: tuple[str, ...] = ("digits.mar",),
                       timeout: float = 120.0) -> Iterator[TorchServe]:
    with stacks.running_torchserve(model_store, workdir, models, timeout) as (torchserve, _):
        yield torchserve


def predictions_stub(torchserve: TorchServe) -> tuple[torchserve_pb2_grpc.InferenceAPIsServiceStub,
                                                        list[tuple[str, str]]]:
    """A stub on TorchServe's gRPC inference port and the metadata that authorizes calls."""
    channel = grpc.insecure_channel(torchserve.endpoint.grpc_target)
    metadata = [("authorization", f"Bearer {Keys.read(torchserve.endpoint.key_file).inference}")]
    return torchserve_pb2_grpc.InferenceAPIsServiceStub(channel), metadata
