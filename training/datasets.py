"""Where a run's examples come from, by `train.data.kind`, read into Splits (training/data.py):

- digits       scikit-learn's bundled 8x8 digits (the demo), 1x8x8 pixels in [0, 1], classes "0".."9"
- imagefolder  path/<class>/<file>, or path/{train,val,test}/<class>/<file> to fix the split yourself; every file
               is decoded, converted and resized as the archive will (handlers/preprocess.py)
- csv          a header row, `label` (a column; for regression one or a list), `features` (default: every other
               column, in file order)
- npz          arrays x, y and optional labels
- python       a factory "module:callable" (+ args) returning (x, y) or (x, y, labels) NumPy arrays

`data.label_noise: 0.2` (classification) flips 20% of the training labels to another class, seeded by the run's
seed; validation and test stay clean (with_label_noise): the noisy-labels case of `gradserve study`.

Every mistake in the data stops the run before its first iteration with a DataError that names the file, the
column or the row, and what to do.
"""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from gradserve.errors import UsageError
from handlers.factory import FactoryError, import_factory
from handlers.preprocess import MODES, ImageError, Preprocess, load_image
from training.config import DataSection, TrainConfig
from training.data import Split, Splits, preprocessed_splits, split_indices

DIGITS_SCALE = 1 / 16  # digits pixels are integers 0..16
SPLIT_FOLDERS = ("train", "val", "test")
LABEL_NOISE_STREAM = 0x1ABE1  # with_label_noise's random stream, apart from the split's and the model's


class DataError(UsageError):
    """The data cannot be trained on as it is; the message names the file, column or row."""


Parts = dict[str, tuple[np.ndarray, np.ndarray]]


def load_splits(cfg: TrainConfig) -> Splits:
    """The config's data, split (seeded; stratified for classification) and preprocessed; with
    `data.label_noise`, a share of the training labels flipped (with_label_noise)."""
    splits = _load_splits(cfg)
    return with_label_noise(splits, cfg.data.label_noise, cfg.seed) if cfg.data.label_noise else splits


def with_label_noise(splits: Splits, share: float, seed: int) -> Splits:
    """The training split with round(share x N) of its labels, picked at random, each moved to another class
    drawn uniformly. Validation and test keep their true labels, so early stopping, the checkpoint rule and the
    test scores all measure the true task while the network fits wrong labels. Seeded by `seed` on a stream of
    its own, so the split and the initialisation are the same as without noise."""
    y = splits.train.y.numpy().copy()  # (N,) class indices
    rng = np.random.default_rng([seed, LABEL_NOISE_STREAM])
    flipped = rng.choice(len(y), size=round(share * len(y)), replace=False)
    classes = len(splits.labels)
    y[flipped] = (y[flipped] + rng.integers(1, classes, size=len(flipped))) % classes  # never the true class
    noise = {"label_noise": {"share": share, "flipped": len(flipped), "of": len(y), "seed": seed}}
    return replace(splits, train=Split(splits.train.x, torch.from_numpy(y)), sources={**splits.sources, **noise})


def _load_splits(cfg: TrainConfig) -> Splits:
    data = cfg.data
    if data.kind == "digits":
        return load_digits_splits(cfg.val_fraction, cfg.test_fraction, cfg.seed, data.standardized)
    if data.kind == "imagefolder":
        parts, labels, preprocess = _imagefolder(cfg)
        return preprocessed_splits(parts, labels, cfg.task, preprocess, data.standardized, "imagefolder",
                                   {"path": data.path})
    x, y, labels, features = _table(data, cfg.task)
    kind = "image" if x.ndim == 4 else "table"
    if x.ndim not in (2, 4):
        raise DataError(f"{data.kind} data: x must be (N, F) rows or (N, C, H, W) images, got shape {list(x.shape)}")
    preprocess = Preprocess(kind, tuple(int(d) for d in x.shape[1:]), mode="", feature_names=features)
    parts = _split(x, y, cfg)
    return preprocessed_splits(parts, labels, cfg.task, preprocess, data.standardized, data.kind,
                               {"path": data.path} if data.path else {"factory": data.factory})


def load_digits_splits(val_fraction: float, test_fraction: float, seed: int, standardize: bool = False) -> Splits:
    digits = load_digits()
    x = (digits.images * DIGITS_SCALE).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    train, val, test = split_indices(y, val_fraction, test_fraction, seed, stratify=True)
    preprocess = Preprocess("image", (1, 8, 8), mode="L", extra={"scale": DIGITS_SCALE})
    parts = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
    splits = preprocessed_splits(parts, tuple(str(k) for k in range(10)), "classification", preprocess,
                                 standardize, "digits")
    return replace(splits, scale=DIGITS_SCALE)


def _split(x: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> Parts:
    train, val, test = split_indices(y if cfg.task == "classification" else np.zeros(len(y)), cfg.val_fraction,
                                     cfg.test_fraction, cfg.seed, stratify=cfg.task == "classification")
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


# --- image folders -----------------------------------------------------------------------------------------------


def _imagefolder(cfg: TrainConfig) -> tuple[Parts, tuple[str, ...], Preprocess]:
    data = cfg.data
    root = Path(str(data.path))
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder: imagefolder wants path/<class>/<image files>")
    if cfg.task != "classification":
        raise DataError("imagefolder data is labelled by its class folders: use task: classification")
    preprocess = Preprocess("image", (MODES[data.image.mode], *data.image.size), mode=data.image.mode)
    fixed = [root / name for name in SPLIT_FOLDERS]
    if all(folder.is_dir() for folder in fixed):
        labels = _classes(fixed[0])
        for folder in fixed[1:]:
            if _classes(folder) != labels:
                raise DataError(f"{folder} has the classes {list(_classes(folder))}, {fixed[0]} has {list(labels)}: "
                                "every split needs the same class folders")
        parts = {name: _read_images(folder, labels, preprocess) for name, folder in zip(SPLIT_FOLDERS, fixed,
                                                                                        strict=True)}
        return parts, labels, preprocess
    labels = _classes(root)
    x, y = _read_images(root, labels, preprocess)
    return _split(x, y, cfg), labels, preprocess


def _classes(folder: Path) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"{folder} must hold one folder per class (at least two); found {found}")
    return classes


def _read_images(folder: Path, labels: tuple[str, ...], preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    rows, targets = [], []
    for index, name in enumerate(labels):
        files = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{folder / name} holds no image files: every class needs examples")
        for path in files:
            try:
                rows.append(load_image(path.read_bytes(), preprocess.in_shape[1:], preprocess.mode))
            except ImageError as e:
                raise DataError(f"{path} is not an image the decoder accepts ({e}); remove it or convert it") from None
            targets.append(index)
    return np.stack(rows), np.asarray(targets, dtype=np.int64)


# --- tables: csv, npz, python --------------------------------------------------------------------------------------


def _table(data: DataSection, task: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """(x, y, labels, feature names): labels are class names, or target names for regression."""
    if data.kind == "csv":
        return _csv(data, task)
    x, y, labels = _npz(data) if data.kind == "npz" else _python(data)
    x = np.asarray(x, dtype=np.float32)
    if len(x) != len(y):
        raise DataError(f"{data.kind} data: x has {len(x)} rows but y has {len(y)}")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0][0])
        raise DataError(f"{data.kind} data: x has a NaN or infinite value in row {row}")
    y, labels = _targets(y, labels, task, data.kind)
    features = tuple(f"x{i}" for i in range(x.shape[1])) if x.ndim == 2 else ()
    return x, y, labels, features


def _npz(data: DataSection) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    path = Path(str(data.path))
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist (npz data: a file with arrays x, y and optional labels)")
    with np.load(path, allow_pickle=False) as arrays:
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise DataError(f"{path} has no array(s) {missing}; it holds {sorted(arrays.files)}")
        labels = tuple(str(v) for v in arrays["labels"]) if "labels" in arrays else None
        return arrays["x"], arrays["y"], labels


def _python(data: DataSection) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    try:
        made = import_factory(str(data.factory))(**data.args)
    except FactoryError as e:
        raise DataError(f"data.factory: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's code raises
        raise DataError(f"data.factory {data.factory!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise DataError(f"data.factory {data.factory!r} must return (x, y) or (x, y, labels), got {type(made)}")
    labels = tuple(str(v) for v in made[2]) if len(made) == 3 else None
    return np.asarray(made[0]), np.asarray(made[1]), labels


def _targets(y: np.ndarray, labels: tuple[str, ...] | None, task: str,
             source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Classification: class indices 0..K-1 and K names; regression: float targets (N, T) and T names."""
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        y = y[:, None] if y.ndim == 1 else y
        if not np.isfinite(y).all():
            row = int(np.argwhere(~np.isfinite(y))[0][0])
            raise DataError(f"{source} data: the regression target of row {row} is not a finite number")
        names = labels or tuple(f"y{i}" for i in range(y.shape[1]))
        return y.astype(np.float32), tuple(names)
    values = np.asarray(y).reshape(-1)
    classes = np.unique(values)
    if labels is None:
        labels = tuple(str(v) for v in classes)
        index = np.searchsorted(classes, values)
    else:
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= len(labels):
            raise DataError(f"{source} data: with labels given, y must be class indices 0..{len(labels) - 1}")
        index = values
    if len(labels) < 2:
        raise DataError(f"{source} data has only one class ({labels[0]!r}): classification needs two or more")
    return index.astype(np.int64), labels


def _csv(data: DataSection, task: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    path = Path(str(data.path))
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist (csv data: a file with a header row)")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        records = [row for row in reader if any(cell.strip() for cell in row)]
    label_columns = (data.label,) if isinstance(data.label, str) else tuple(data.label or ())
    missing = [c for c in label_columns if c not in header]
    if missing:
        raise DataError(f"{path}: no label column {missing[0]!r}; the header has {header}")
    features = tuple(data.features) if data.features else tuple(h for h in header if h not in label_columns)
    if unknown := [c for c in features if c not in header]:
        raise DataError(f"{path}: no feature column {unknown[0]!r}; the header has {header}")
    if not records:
        raise DataError(f"{path} has a header but no rows")
    x = _numeric(path, header, records, features)
    if task == "regression":
        y, names = _targets(_numeric(path, header, records, label_columns), label_columns, task, str(path))
        return x, y, names, features
    values = [_cell(path, header, row, number, label_columns[0]) for number, row in enumerate(records, start=2)]
    y, labels = _csv_classes(values)
    if len(labels) < 2:
        raise DataError(f"{path}: column {label_columns[0]!r} has only one class ({labels[0]!r}); "
                        "classification needs two or more")
    return x, y, labels, features


def _cell(path: Path, header: list[str], row: list[str], number: int, column: str) -> str:
    i = header.index(column)
    value = row[i].strip() if i < len(row) else ""
    if value == "":
        raise DataError(f"{path}: row {number} has an empty cell in column {column!r}; fill it or drop the row")
    return value


def _numeric(path: Path, header: list[str], records: list[list[str]], columns: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(records), len(columns)), dtype=np.float32)
    for r, row in enumerate(records):
        for c, column in enumerate(columns):
            value = _cell(path, header, row, r + 2, column)
            try:
                out[r, c] = float(value)
            except ValueError:
                raise DataError(f"{path}: row {r + 2}, column {column!r} is {value!r}, not a number; "
                                "features must be numeric") from None
            if not math.isfinite(out[r, c]):
                raise DataError(f"{path}: row {r + 2}, column {column!r} is {value!r}, not a finite number")
    return out


def _csv_classes(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and names: names sort as numbers when every label is one, else as text."""
    def number(v: str) -> float | None:
        try:
            return float(v)
        except ValueError:
            return None

    numeric = all(number(v) is not None for v in values)
    names = sorted(set(values), key=lambda v: (number(v), v) if numeric else v)  # type: ignore[arg-type, return-value]
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[v] for v in values], dtype=np.int64), tuple(names)
