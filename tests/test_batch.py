"""Batch jobs over files: every format, resume after SIGKILL, shards, malformed rows (in-process handler).

The same jobs against the real front door and TorchServe are in tests/test_batch_served.py.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torchserve_fixtures import packaged_store

from client import batch
from client.batch_transport import LocalTransport
from gradserve.errors import UsageError
from handlers import codec

ROWS = 10_000


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packaged_store(tmp_path_factory) / "digits.mar"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).random((ROWS, 1, 8, 8), dtype=np.float32)


def write_inputs(folder: Path, rows: np.ndarray) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"npy": folder / "in.npy", "jsonl": folder / "in.jsonl", "csv": folder / "in.csv"}
    np.save(paths["npy"], rows)
    flat = rows.reshape(len(rows), -1)
    with paths["jsonl"].open("w") as f:
        for i, row in enumerate(flat):
            f.write(json.dumps({"id": f"r{i}", "input": row.tolist()}) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *(f"p{j}" for j in range(flat.shape[1]))])
        writer.writerows([f"r{i}", *map(repr, row.tolist())] for i, row in enumerate(flat))
    return paths


def run(archive: Path, input: Path, output: Path, **kw: object) -> batch.Summary:
    config = batch.BatchConfig(input=input, output=output, local=archive, progress=False, **kw)  # type: ignore[arg-type]

    async def go() -> batch.Summary:
        transport = LocalTransport(archive)
        try:
            return await batch.run_job(config, transport)
        finally:
            await transport.close()

    return asyncio.run(go())


def reference_logits(archive: Path, rows: np.ndarray) -> np.ndarray:
    async def go() -> np.ndarray:
        transport = LocalTransport(archive)
        try:
            return np.concatenate([(await transport.infer("input", rows[i:i + 1000])).values
                                   for i in range(0, len(rows), 1000)])
        finally:
            await transport.close()

    return asyncio.run(go())


def test_a_local_job_asks_the_handler_for_what_it_writes_only(archive: Path, rows: np.ndarray) -> None:
    """As a served job asks the front door: the handler computes nothing the job's output does not hold."""
    async def go() -> list[tuple[str, ...] | None]:
        transport = LocalTransport(archive)
        asked: list[tuple[str, ...] | None] = []
        handle = transport._model.handle

        def spy(payloads: list[bytes]) -> list[bytes]:
            asked.extend(codec.decode(p).outputs for p in payloads)
            return handle(payloads)

        transport._model.handle = spy  # type: ignore[method-assign]
        try:
            answer = await transport.infer("input", rows[:3])
            assert answer.values.shape == (3, 10) and len(answer.names) == 3
        finally:
            await transport.close()
        return asked

    assert asyncio.run(go()) == [("logits", "class_name")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_format_gives_one_prediction_per_row_in_order(archive: Path, rows: np.ndarray, tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "in", rows)
    expected = reference_logits(archive, rows)
    for kind, path in paths.items():
        out = tmp_path / f"out-{kind}.jsonl"
        summary = run(archive, path, out, rows_per_request=500)
        assert (summary.rows, summary.done, summary.failed) == (ROWS, ROWS, 0), kind
        got = read_jsonl(out)
        ids = [g["id"] for g in got]
        assert ids == ([str(i) for i in range(ROWS)] if kind == "npy" else [f"r{i}" for i in range(ROWS)])
        logits = np.array([g["logits"] for g in got], dtype=np.float32)
        assert np.abs(logits - expected).max() <= 1e-4, kind  # csv/jsonl carry decimal text
        assert [g["label"] for g in got] == expected.argmax(1).tolist()
    npy_out = tmp_path / "out.npy"
    run(archive, paths["npy"], npy_out)
    assert np.array_equal(np.load(npy_out), expected)


def test_malformed_rows_go_to_the_errors_file_and_the_rest_succeed(archive: Path, rows: np.ndarray,
                                                                   tmp_path: Path) -> None:
    flat = rows[:300].reshape(300, -1)
    lines = [json.dumps({"id": f"r{i}", "input": row.tolist()}) for i, row in enumerate(flat)]
    lines[7] = json.dumps({"id": "r7", "input": [float("nan")] * 64}).replace("NaN", "NaN")
    lines[100] = json.dumps({"id": "r100", "input": [1.0, 2.0]})
    lines[200] = "this is not json"
    lines[250] = json.dumps({"id": "r250", "input": [[1e39] * 64]})  # overflows float32 to inf
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run(archive, source, out, rows_per_request=64)
    assert (summary.done, summary.failed) == (296, 4)
    errors = {e["id"]: e for e in read_jsonl(batch.errors_path(out))}
    assert set(errors) == {"r7", "r100", "line-201", "r250"}
    assert all(e["status"] == "INVALID_ARGUMENT" for e in errors.values())
    assert "finite" in errors["r7"]["message"] and "expected 64" in errors["r100"]["message"]
    good = [i for i in range(300) if i not in (7, 100, 200, 250)]
    got = read_jsonl(out)
    assert [g["id"] for g in got] == [f"r{i}" for i in good]
    expected = reference_logits(archive, rows[good])
    assert np.abs(np.array([g["logits"] for g in got]) - expected).max() <= 1e-4


def test_two_shards_merged_equal_one_unsharded_run(archive: Path, rows: np.ndarray, tmp_path: Path) -> None:
    source = tmp_path / "in.npy"
    np.save(source, rows)
    whole = tmp_path / "whole.jsonl"
    run(archive, source, whole)
    parts = [tmp_path / f"part-{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        summary = run(archive, source, part, shard=(i, 2))
        assert summary.rows == ROWS // 2
    merged = tmp_path / "merged.jsonl"
    assert batch.merge(list(reversed(parts)), merged) == 0
    assert merged.read_bytes() == whole.read_bytes()
    with pytest.raises(UsageError, match="missing or repeated"):
        batch.merge([parts[1]], tmp_path / "half.jsonl")


def test_a_job_killed_midway_resumes_without_losing_or_repeating_a_row(archive: Path, rows: np.ndarray,
                                                                          tmp_path: Path) -> None:
    source = tmp_path / "in.npy"
    np.save(source, rows)
    whole = tmp_path / "whole.jsonl"
    run(archive, source, whole, rows_per_request=20)
    out = tmp_path / "resumed.jsonl"
    command = [sys.executable, "-m", "gradserve.cli", "batch", "--local", str(archive), "--input", str(source),
               "--output", str(out), "--rows-per-request", "20", "--concurrency", "1", "--no-progress"]
    work = batch.work_dir(out)
    with (tmp_path / "job.log").open("w") as log:
        job = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while len(list(work.glob("chunk-*.npz"))) < 20 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert job.poll() is None, "the job finished before it could be killed"
            os.kill(job.pid, signal.SIGKILL)
        finally:
            job.kill()
            job.wait()
    done_before = len(list(work.glob("chunk-*.npz")))
    assert 20 <= done_before < ROWS // 20 and not out.exists()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout.splitlines()[-1])["done"] == ROWS
    assert out.read_bytes() == whole.read_bytes()
    assert not work.exists()


def test_a_different_job_refuses_the_progress_of_another(archive: Path, rows: np.ndarray, tmp_path: Path) -> None:
    source = tmp_path / "in.npy"
    np.save(source, rows[:100])
    out = tmp_path / "out.jsonl"
    work = batch.work_dir(out)
    work.mkdir()
    (work / "job.json").write_text(json.dumps({"input": "something else"}))
    with pytest.raises(UsageError, match="different job"):
        run(archive, source, out)
