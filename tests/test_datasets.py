"""A user's own data and model for training: every data kind, the factory contract, regression, and every
mistake stopping the run before its first iteration with a message that names the file, column or row."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradserve.errors import UsageError
from handlers.factory import FactoryError, ModelSpec, call_factory
from handlers.preprocess import ImageError, load_image
from training.config import DataSection, ModelSection, TrainConfig
from training.datasets import load_splits
from training.train import train

MLP = '''
from torch import nn

def build(in_shape, num_classes, hidden=8):
    return nn.Sequential(nn.Linear(in_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

def build_any(**kwargs):
    (features,) = kwargs["in_shape"]
    return nn.Linear(features, kwargs["num_classes"])

def build_fixed():  # ignores the data: a model for 3 features
    return nn.Linear(3, 2)

def build_broken(in_shape, num_classes):
    raise RuntimeError("the factory itself failed")

def not_a_model(in_shape, num_classes):
    return "a string"
'''
CNN = '''
from torch import nn

def build(in_shape, num_classes):
    return nn.Sequential(nn.Conv2d(in_shape[0], 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """A user's code folder with their models."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "usernet.py").write_text(textwrap.dedent(MLP))
    (folder / "usercnn.py").write_text(textwrap.dedent(CNN))
    return folder


def config(tmp_path: Path, code: Path, data: dict, factory: str = "usernet:build", task: str = "classification",
           epochs: int = 2) -> TrainConfig:
    return TrainConfig(name="user", runs_dir=str(tmp_path / "runs"), task=task, data=DataSection(**data),
                       model=ModelSection(factory=factory, args={}), code_dir=str(code), epochs=epochs, batch_size=16,
                       eval_every=5, patience=None, threads=1, progress=False)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def table(path: Path, n: int = 60, label: str = "kind") -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    names = np.where(x[:, 0] + x[:, 1] > 0, "wide", "narrow")
    return write_csv(path, ["a", "b", label, "c"], [[*x[i, :2], names[i], x[i, 2]] for i in range(n)])


def images(root: Path, classes: tuple[str, ...] = ("circle", "square"), per_class: int = 12) -> Path:
    """Small RGB PNGs: each class drawn in its own colour."""
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((10, 12, 3), 30 * i % 255, np.uint8)
            pixels[2:8, 3:9, k % 3] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def assert_not_started(cfg: TrainConfig) -> None:
    """A refused run leaves no checkpoint and no metrics behind: it stopped before its first iteration."""
    run = Path(cfg.runs_dir) / cfg.name
    assert not (run / "metrics.jsonl").exists() and not list(run.glob("checkpoints/*.pt"))


# --- every kind of data -------------------------------------------------------------------------------------


def test_csv_classification_with_string_labels_trains_and_names_the_classes(tmp_path: Path, code: Path) -> None:
    cfg = config(tmp_path, code, {"kind": "csv", "path": str(table(tmp_path / "t.csv", n=200)), "label": "kind"},
                 epochs=10)
    data = load_splits(cfg)
    assert data.labels == ("narrow", "wide") and data.shape == (3,)
    assert data.preprocess is not None and data.preprocess.feature_names == ("a", "b", "c")
    assert abs(float(data.train.x.mean())) < 1e-5  # standardised with the train split's statistics
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected"]["test_accuracy"] > 0.5


def test_numeric_csv_labels_sort_as_numbers(tmp_path: Path, code: Path) -> None:
    rows = [[i, i % 3 * 5] for i in range(30)]  # labels 0, 5, 10: as text "10" < "5"
    path = write_csv(tmp_path / "n.csv", ["x", "y"], rows)
    data = load_splits(config(tmp_path, code, {"kind": "csv", "path": str(path), "label": "y"}))
    assert data.labels == ("0", "5", "10")


def test_regression_from_npz_and_python_factories(tmp_path: Path, code: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) * 30 + 500).astype(np.float32)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    cfg = config(tmp_path, code, {"kind": "npz", "path": str(tmp_path / "r.npz")}, task="regression", epochs=40)
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert {"test_mae", "test_mse", "test_r2"} <= set(summary["selected"]) and summary["best_test_r2"] > 0.3
    assert summary["diagnosis"]["verdict"] in ("good fit", "overfitting", "underfitting")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_r2" in line for line in lines if line["kind"] == "eval")
    (code / "userdata.py").write_text("import numpy as np\n"
                                      "def make(n):\n    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)\n"
                                      "    return x, x.sum(1), ['total']\n")
    data = load_splits(config(tmp_path, code, {"kind": "python", "factory": "userdata:make", "args": {"n": 40}},
                              task="regression"))
    assert data.labels == ("total",) and data.train.y.shape[1] == 1


def test_imagefolder_with_and_without_fixed_splits(tmp_path: Path, code: Path) -> None:
    cfg = config(tmp_path, code, {"kind": "imagefolder", "path": str(images(tmp_path / "img")),
                                  "image": {"size": [8, 8], "mode": "RGB"}}, factory="usercnn:build")
    data = load_splits(cfg)
    assert data.labels == ("circle", "square") and data.shape == (3, 8, 8)
    fixed = tmp_path / "fixed"
    for part in ("train", "val", "test"):
        images(fixed / part, per_class=6)
    data = load_splits(config(tmp_path, code, {"kind": "imagefolder", "path": str(fixed),
                                               "image": {"size": [8, 8], "mode": "L"}}, factory="usercnn:build"))
    assert (len(data.train), len(data.val), len(data.test)) == (12, 12, 12) and data.shape == (1, 8, 8)
    train(cfg)


def test_the_factory_gets_in_shape_and_num_classes_when_it_names_them() -> None:
    open_ended = call_factory(lambda **kw: torch.nn.Linear(kw["in_shape"][0], kw["num_classes"]), {}, (5,), 3)
    assert open_ended.out_features == 3
    assert call_factory(lambda width: torch.nn.Linear(width, 2), {"width": 4}, (5,), 3).in_features == 4
    spec = ModelSpec("training.model:build_convnet", (1, 8, 8), 10, {"channels": [4]})
    assert ModelSpec.from_dict(spec.to_dict()) == spec and spec.build().head.out_features == 10


# --- mistakes: each stops the run before its first iteration, saying what is wrong -----------------------------


@pytest.mark.parametrize(("factory", "words"), [
    ("nosuchmodule:build", "cannot import the module of the factory 'nosuchmodule:build'"),
    ("usernet:nosuch", "has no attribute 'nosuch'"),
    ("usernet", "must be written 'module:callable'"),
    ("usernet:build_broken", "the factory itself failed"),
    ("usernet:not_a_model", "returned str, not a torch.nn.Module"),
])
def test_a_factory_that_cannot_be_used(tmp_path: Path, code: Path, factory: str, words: str) -> None:
    cfg = config(tmp_path, code, {"kind": "csv", "path": str(table(tmp_path / "t.csv")), "label": "kind"},
                 factory=factory)
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace("[", r"\[")):
        train(cfg)
    assert_not_started(cfg)


def test_a_model_that_rejects_the_datas_shape_is_named_with_the_shape(tmp_path: Path, code: Path) -> None:
    rows = [[i, i + 1.0, i % 2] for i in range(30)]  # 2 features, but build_fixed takes 3
    cfg = config(tmp_path, code, {"kind": "csv", "path": str(write_csv(tmp_path / "two.csv", ["p", "q", "y"], rows)),
                                  "label": "y"}, factory="usernet:build_fixed")
    with pytest.raises(UsageError, match=r"rejected inputs of shape \[2, 2\] \(in_shape \[2\]\)"):
        train(cfg)
    assert_not_started(cfg)


def test_bad_image_folders(tmp_path: Path, code: Path) -> None:
    def fails(path: Path, words: str) -> None:
        cfg = config(tmp_path, code, {"kind": "imagefolder", "path": str(path), "image": {"size": [8, 8]}},
                     factory="usercnn:build")
        with pytest.raises(UsageError, match=words):
            train(cfg)
        assert_not_started(cfg)

    fails(tmp_path / "missing", "is not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "found none")
    fails(images(tmp_path / "one", classes=("circle",)), "found only 'circle'")
    two = images(tmp_path / "two")
    (two / "square" / "notes.txt").write_text("not an image")
    fails(two, "square/notes.txt is not an image")
    (two / "square" / "notes.txt").unlink()
    (two / "empty-class").mkdir()
    fails(two, "empty-class holds no image files")


@pytest.mark.parametrize(("rows", "label", "words"), [
    ([["1", "2", "x"]], "nolabel", "no label column 'nolabel'"),
    ([["1", "abc", "x"], ["2", "3", "y"]], "kind", r"row 2, column 'b' is 'abc', not a number"),
    ([["1", "", "x"], ["2", "3", "y"]], "kind", r"row 2 has an empty cell in column 'b'"),
    ([["1", "2", ""], ["2", "3", "y"]], "kind", r"row 2 has an empty cell in column 'kind'"),
    ([["1", "2", "x"], ["2", "3", "x"]], "kind", "only one class"),
])
def test_bad_csv_files(tmp_path: Path, code: Path, rows: list, label: str, words: str) -> None:
    path = write_csv(tmp_path / "bad.csv", ["a", "b", "kind"], rows)
    cfg = config(tmp_path, code, {"kind": "csv", "path": str(path), "label": label})
    with pytest.raises(UsageError, match=words):
        train(cfg)
    assert_not_started(cfg)


def test_regression_labels_must_be_finite(tmp_path: Path, code: Path) -> None:
    path = write_csv(tmp_path / "r.csv", ["a", "y"], [[i, "nan" if i == 4 else i] for i in range(20)])
    cfg = config(tmp_path, code, {"kind": "csv", "path": str(path), "label": "y"}, task="regression")
    with pytest.raises(UsageError, match=r"row 6, column 'y' is 'nan', not a finite number"):
        train(cfg)
    np.savez(tmp_path / "r.npz", x=np.ones((10, 2), np.float32), y=np.array([1.0] * 9 + [np.inf]))
    cfg = config(tmp_path, code, {"kind": "npz", "path": str(tmp_path / "r.npz")}, task="regression")
    with pytest.raises(UsageError, match="regression target of row 9 is not a finite number"):
        train(cfg)
    assert_not_started(cfg)


def test_images_are_decoded_as_the_archive_will(tmp_path: Path) -> None:
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    x = load_image((tmp_path / "p.png").read_bytes(), (4, 6), "RGB")
    assert x.shape == (3, 4, 6) and np.allclose(x, pixels.transpose(2, 0, 1) / 255)
    for bad in (b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"plain text"):
        with pytest.raises(ImageError):
            load_image(bad, (4, 6), "RGB")
    with pytest.raises(FactoryError):
        ModelSpec("x:y", (1,), 1).build()
