"""Batch jobs against the real stack: `gradserve serve` (front door + TorchServe) as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from frontdoor_fixtures import GRADSERVE, FrontDoor, built_store, running_front_door
from test_batch import ROWS, read_jsonl, write_inputs

from client import batch


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_store(tmp_path_factory).path


@pytest.fixture(scope="module")
def door(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    with running_front_door(store, tmp_path_factory.mktemp("door")) as door:
        yield door


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(1).random((ROWS, 1, 8, 8), dtype=np.float32)


def job(door: FrontDoor, source: Path, output: Path, *extra: str) -> list[str]:
    return [str(GRADSERVE), "batch", "--grpc", door.grpc_target, "--token", str(door.token), "--model", "digits",
            "--input", str(source), "--output", str(output), "--no-progress", *extra]


def local_reference(store: Path, source: Path, output: Path) -> np.ndarray:
    command = [sys.executable, "-m", "gradserve.cli", "batch", "--local", str(store / "digits.mar"),
               "--input", str(source), "--output", str(output), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return np.load(output)


def test_every_format_through_the_front_door_equals_the_offline_job(door: FrontDoor, store: Path,
                                                                    rows: np.ndarray, tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "in", rows)
    expected = local_reference(store, paths["npy"], tmp_path / "local.npy")
    for kind, path in paths.items():
        out = tmp_path / f"served-{kind}.jsonl"
        done = subprocess.run(job(door, path, out), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        assert (summary["done"], summary["failed"]) == (ROWS, 0)
        got = read_jsonl(out)
        assert len(got) == ROWS
        logits = np.array([g["logits"] for g in got], dtype=np.float32)
        assert np.abs(logits - expected).max() <= 1e-4, kind
        assert [g["label"] for g in got] == expected.argmax(1).tolist()
    served_npy = tmp_path / "served.npy"
    subprocess.run(job(door, paths["npy"], served_npy), check=True, capture_output=True, timeout=300)
    assert np.abs(np.load(served_npy) - expected).max() <= 1e-5


def test_bad_rows_are_reported_by_the_server_and_the_rest_succeed(door: FrontDoor, rows: np.ndarray,
                                                                  tmp_path: Path) -> None:
    bad = rows[:1000].copy()
    bad[[3, 500, 999]] = np.nan
    source = tmp_path / "bad.npy"
    np.save(source, bad)
    out = tmp_path / "out.jsonl"
    done = subprocess.run(job(door, source, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "3 row(s) failed" in done.stderr
    errors = read_jsonl(batch.errors_path(out))
    assert sorted(e["id"] for e in errors) == ["3", "500", "999"]
    assert all(e["status"] == "INVALID_ARGUMENT" and "finite" in e["message"] for e in errors)
    assert len(read_jsonl(out)) == 997


def test_torchserve_restarted_during_a_job_costs_no_row(door: FrontDoor, store: Path, rows: np.ndarray,
                                                        tmp_path: Path) -> None:
    source = tmp_path / "in.npy"
    np.save(source, rows)
    expected = local_reference(store, source, tmp_path / "local.npy")
    out = tmp_path / "served.npy"
    work = batch.work_dir(out)
    with (tmp_path / "job.log").open("w") as log:
        process = subprocess.Popen(job(door, source, out, "--rows-per-request", "16", "--concurrency", "2"),
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while len(list(work.glob("chunk-*.npz"))) < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            torchserve = door.torchserve()
            assert torchserve is not None and process.poll() is None
            os.killpg(os.getpgid(torchserve.pid), signal.SIGKILL)  # TorchServe and its workers, mid-job
            assert process.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()
        finally:
            process.kill()
            process.wait()
    assert np.abs(np.load(out) - expected).max() <= 1e-5
    door.wait_ready()  # the front door restarted TorchServe for the tests after this one
