"""Reading batch-job inputs and writing their outputs, by file extension.

Inputs: `.npy` (float32 [N, C, H, W]; ids are row numbers), `.jsonl` (one {"id": ..., "input": [...]} per
line; the row nested or flat), `.csv` (an `id` column, then the flattened pixels). A row that cannot be read
becomes a bad row with a reason instead of stopping the job. Outputs: `.jsonl` (id, label, logits) or `.npy`
(logits [N, K] in input order; rows that failed are NaN).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from gradserve.errors import UsageError

INPUT_SUFFIXES = (".npy", ".jsonl", ".csv")
OUTPUT_SUFFIXES = (".npy", ".jsonl")


@dataclass
class Inputs:
    ids: list[str]
    rows: np.ndarray  # (N, C, H, W) float32; a bad row holds zeros and is never sent
    bad: dict[int, str] = field(default_factory=dict)  # row index -> why it could not be read

    def __len__(self) -> int:
        return len(self.ids)


def check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    if path.suffix not in allowed:
        raise UsageError(f"{what} {path} must end in one of {', '.join(allowed)}")


def read_inputs(path: Path, row_shape: tuple[int, ...]) -> Inputs:
    check_suffix(path, INPUT_SUFFIXES, "input file")
    if not path.exists():
        raise UsageError(f"input file {path} does not exist")
    if path.suffix == ".npy":
        return _read_npy(path, row_shape)
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    return _from_records(records, row_shape)


def _read_npy(path: Path, row_shape: tuple[int, ...]) -> Inputs:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim < 1 or int(np.prod(array.shape[1:])) != int(np.prod(row_shape)):
        expected = ", ".join(map(str, row_shape))
        raise UsageError(f"{path} holds an array of shape {list(array.shape)}; expected [N, {expected}]")
    rows = np.ascontiguousarray(array, dtype=np.float32).reshape((len(array), *row_shape))
    return Inputs([str(i) for i in range(len(rows))], rows)


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open() as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield str(record["id"]), record["input"]
            except (ValueError, KeyError, TypeError):
                yield f"line-{number + 1}", ValueError(
                    f'line {number + 1} is not a JSON object with "id" and "input"'
                )


def _csv_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "id":
            raise UsageError(f"{path}: the first column of the header must be 'id', then the pixels")
        for number, record in enumerate(reader):
            if record:
                yield (record[0] or f"line-{number + 2}"), record[1:]


def _from_records(records: Iterator[tuple[str, object]], row_shape: tuple[int, ...]) -> Inputs:
    size = int(np.prod(row_shape))
    ids: list[str] = []
    flat: list[np.ndarray] = []
    bad: dict[int, str] = {}
    zeros = np.zeros(size, dtype=np.float32)
    for index, (row_id, values) in enumerate(records):
        ids.append(row_id)
        try:
            if isinstance(values, Exception):
                raise values
            with np.errstate(over="ignore"):  # values beyond float32 become inf; the server rejects them
                row = np.asarray(values, dtype=np.float32).reshape(-1)
            if row.size != size:
                raise ValueError(f"row has {row.size} values; expected {size} (shape {list(row_shape)})")
            flat.append(row)
        except (ValueError, TypeError) as e:
            bad[index] = f"unreadable row: {e}"
            flat.append(zeros)
    rows = np.stack(flat).reshape((len(ids), *row_shape)) if flat else np.zeros((0, *row_shape), np.float32)
    return Inputs(ids, rows, bad)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write a temp file beside `path` that replaces it only once complete: a reader, or a job killed
    mid-write and run again, never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open(mode) as f:
        yield f
    os.replace(tmp, path)


def write_outputs(path: Path, ids: list[str], logits: np.ndarray, ok: np.ndarray) -> None:
    check_suffix(path, OUTPUT_SUFFIXES, "output file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        with atomic_open(path, "wb") as f:
            np.save(f, np.where(ok[:, None], logits, np.nan).astype(np.float32))
        return
    labels = logits.argmax(axis=1)
    with atomic_open(path) as f:
        for i in np.flatnonzero(ok):
            f.write(json.dumps({"id": ids[i], "label": int(labels[i]), "logits": logits[i].tolist()}) + "\n")


def write_errors(path: Path, errors: list[dict[str, str]]) -> None:
    with atomic_open(path) as f:
        for error in errors:
            f.write(json.dumps(error) + "\n")
