"""Reading batch-job inputs and writing their outputs.

Inputs, for the model's contract (client/contract.py):
- a folder of image files (recursively; a row's id is its path relative to the folder), for image models: the
  files travel as they are (the `image` input) and are read when their chunk runs;
- `.csv`: a header row. A table model's feature columns are read by name (any order; an `id` column, if present,
  gives the rows' ids); for an image model, an `id` column then the flattened pixels;
- `.npy` (float32 [N, *row_shape]; ids are row numbers); `.jsonl` (one {"id": ..., "input": [...]} per line).
A row that cannot be read becomes a bad row with a reason instead of stopping the job.

Outputs: `.jsonl`, one line per row that succeeded: id, label (class index), class_name and logits for a
classifier; id and prediction (one value per target) for a regressor. `.npy`: logits [N, K] or predictions
[N, T] in input order, rows that failed NaN.
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

from client.contract import ModelContract
from gradserve.errors import UsageError

INPUT_SUFFIXES = (".npy", ".jsonl", ".csv")
OUTPUT_SUFFIXES = (".npy", ".jsonl")


@dataclass
class Inputs:
    ids: list[str]
    input_name: str  # the model input the rows go to: "input" (a tensor) or "image" (files)
    rows: np.ndarray | None = None  # "input": (N, *row_shape) float32; a bad row holds zeros and is never sent
    files: list[Path] = field(default_factory=list)  # "image": read when their chunk runs
    bad: dict[int, str] = field(default_factory=dict)  # row index -> why it could not be read

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: list[int]) -> tuple[np.ndarray, dict[int, str]]:
        """The rows at `indices`, and those of them that could not be read (index -> why)."""
        if self.rows is not None:
            return self.rows[indices], {}
        values, unreadable = [], {}
        for i in indices:
            try:
                values.append(self.files[i].read_bytes())
            except OSError as e:
                unreadable[i] = f"unreadable file: {e}"
                values.append(b"")
        return np.array(values, dtype=object), unreadable


def check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    if path.suffix not in allowed:
        raise UsageError(f"{what} {path} must end in one of {', '.join(allowed)}")


def read_inputs(path: Path, contract: ModelContract) -> Inputs:
    if not path.exists():
        raise UsageError(f"input {path} does not exist")
    if path.is_dir():
        return _image_folder(path, contract)
    check_suffix(path, INPUT_SUFFIXES, "input file")
    if path.suffix == ".npy":
        return _read_npy(path, contract.row_shape)
    if path.suffix == ".csv" and contract.feature_names:
        return _from_records(table_records(path, contract.feature_names), contract.row_shape)
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    return _from_records(records, contract.row_shape)


def _image_folder(folder: Path, contract: ModelContract) -> Inputs:
    if not contract.takes_images:
        raise UsageError(f"{folder} is a folder of files, but model {contract.name!r} does not take images; "
                         "give it a .csv, .npy or .jsonl of rows")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UsageError(f"{folder} holds no files")
    return Inputs([p.relative_to(folder).as_posix() for p in files], "image", files=files)


def _read_npy(path: Path, row_shape: tuple[int, ...]) -> Inputs:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim < 1 or int(np.prod(array.shape[1:])) != int(np.prod(row_shape)):
        expected = ", ".join(map(str, row_shape))
        raise UsageError(f"{path} holds an array of shape {list(array.shape)}; expected [N, {expected}]")
    rows = np.ascontiguousarray(array, dtype=np.float32).reshape((len(array), *row_shape))
    return Inputs([str(i) for i in range(len(rows))], "input", rows)


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


def table_records(path: Path, features: tuple[str, ...]) -> Iterator[tuple[str, object]]:
    """(id, the feature values in the model's order) per row of a CSV with a header; ids from an `id` column,
    else row numbers from 0. A cell that is empty or not a number makes its row bad, naming the column."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if missing := [c for c in features if c not in header]:
            raise UsageError(f"{path}: no column(s) {missing}; the model takes the features {list(features)}")
        where = [header.index(c) for c in features]
        id_column = header.index("id") if "id" in header else None
        for number, record in enumerate(r for r in reader if any(cell.strip() for cell in r)):
            row_id = record[id_column].strip() if id_column is not None and id_column < len(record) else str(number)
            yield row_id, _features(record, where, features)


def _features(record: list[str], where: list[int], features: tuple[str, ...]) -> object:
    values = []
    for i, column in zip(where, features, strict=True):
        cell = record[i].strip() if i < len(record) else ""
        try:
            values.append(float(cell))
        except ValueError:
            return ValueError(f"column {column!r} is {cell!r}, not a number")
    return values


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
    return Inputs(ids, "input", rows, bad=bad)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write a temp file beside `path` that replaces it only once complete: a reader, or a job killed
    mid-write and run again, never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open(mode) as f:
        yield f
    os.replace(tmp, path)


def write_outputs(path: Path, ids: list[str], values: np.ndarray, names: np.ndarray | None, ok: np.ndarray,
                  task: str = "classification") -> None:
    """`values`: logits [N, K] (classification, with `names` the class names of the rows) or predictions [N, T]."""
    check_suffix(path, OUTPUT_SUFFIXES, "output file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        with atomic_open(path, "wb") as f:
            np.save(f, np.where(ok[:, None], values, np.nan).astype(np.float32))
        return
    with atomic_open(path) as f:
        for i in np.flatnonzero(ok):
            if task == "regression":
                line = {"id": ids[i], "prediction": values[i].tolist()}
            else:
                line = {"id": ids[i], "label": int(values[i].argmax()), "class_name": str(names[i]) if names is not None
                        else str(int(values[i].argmax())), "logits": values[i].tolist()}
            f.write(json.dumps(line) + "\n")


def write_errors(path: Path, errors: list[dict[str, str]]) -> None:
    with atomic_open(path) as f:
        for error in errors:
            f.write(json.dumps(error) + "\n")
