"""A user's own folder, outside the repository: their model file, their CSV and their image folder, made here.
With only the README's commands it trains, packages and serves both models; predictions come back with the
user's class names; an image sent as a PNG file equals the same image sent as a tensor; and every bad input is
refused for its own request alone."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from common import ROOT
from PIL import Image
from sklearn.datasets import load_wine

from bench.stacks import GRADSERVE, FrontDoor, running_front_door
from client.grpc_client import Client
from handlers.preprocess import load_image

pytestmark = pytest.mark.slow

NET = '''
"""My models."""
from torch import nn


def mlp(in_shape, num_classes, hidden=16):
    return nn.Sequential(nn.Linear(in_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(in_shape, num_classes, width=8):
    return nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''
TABLES = """
train:
  name: wine
  runs_dir: runs
  data: {kind: csv, path: data/wine.csv, label: cultivar}
  model: {factory: "net:mlp", args: {hidden: 16}}
  epochs: 40
  eval_every: 10
  threads: 1
package: {model_store: store}
serve: {model_store: store}
"""
IMAGES = """
train:
  name: shapes
  runs_dir: runs
  data: {kind: imagefolder, path: data/shapes, image: {size: [16, 16], mode: RGB}}
  model: {factory: "net:cnn", args: {width: 8}}
  epochs: 40
  batch_size: 16
  lr: 0.01
  eval_every: 10
  threads: 1
  selection: {decline_window: 2, tolerance: 0.1}  # a small run's gradient norm is noisy
package: {model_store: store}
"""
CULTIVARS = ("barbera", "barolo", "grignolino")


def shape_png(kind: str, rng: np.random.Generator, size: int = 24) -> bytes:
    """A filled circle or square in a random colour on a random background, somewhere in the frame."""
    pixels = np.tile(rng.uniform(0, 80, 3), (size, size, 1))
    r, cy, cx = rng.integers(4, 7), rng.integers(7, size - 7), rng.integers(7, size - 7)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if kind == "circle" else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    pixels[inside] = rng.uniform(150, 255, 3)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def make_user_folder(folder: Path) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "net.py").write_text(textwrap.dedent(NET))
    (folder / "tables.yaml").write_text(TABLES)
    (folder / "images.yaml").write_text(IMAGES)
    wine = load_wine()
    header = [name.replace("/", "_") for name in wine.feature_names]
    with (folder / "data" / "wine.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "cultivar"])
        writer.writerows([*map(float, row), ("barolo", "grignolino", "barbera")[t]]
                         for row, t in zip(wine.data, wine.target, strict=True))
    with (folder / "rows.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *reversed(header)])  # the columns in another order: read by name
        writer.writerows([f"bottle-{i}", *reversed(list(map(float, wine.data[i])))] for i in (0, 70, 150))
    rng = np.random.default_rng(0)
    for kind in ("circle", "square"):
        (folder / "data" / "shapes" / kind).mkdir(parents=True)
        for i in range(60):
            (folder / "data" / "shapes" / kind / f"{i}.png").write_bytes(shape_png(kind, rng))
    (folder / "samples").mkdir()
    for kind in ("circle", "square"):
        (folder / "samples" / f"{kind}.png").write_bytes(shape_png(kind, rng))


def gradserve(folder: Path, *args: str) -> str:
    """A README command, run in the user's folder."""
    done = subprocess.run([str(GRADSERVE), *args], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GRADSERVE_TOKEN": ""})
    assert done.returncode == 0, f"gradserve {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FrontDoor]]:
    folder = tmp_path_factory.mktemp("my-project")
    assert ROOT not in folder.parents
    make_user_folder(folder)
    gradserve(folder, "train", "--config", "tables.yaml", "--no-progress")
    gradserve(folder, "package", "--run", "runs/wine", "--config", "tables.yaml")
    gradserve(folder, "train", "--config", "images.yaml", "--no-progress")
    gradserve(folder, "package", "--run", "runs/shapes", "--config", "images.yaml")
    with running_front_door(folder / "store", folder / "serve", None, config=str(folder / "tables.yaml")) as door:
        yield folder, door


def test_both_models_serve_with_the_users_class_names(served: tuple[Path, FrontDoor]) -> None:
    folder, door = served
    assert sorted(p.name for p in (folder / "store").glob("*.mar")) == ["shapes-1.0.mar", "shapes.mar",
                                                                        "wine-1.0.mar", "wine.mar"]
    wines = [json.loads(line) for line in gradserve(folder, "predict", "--grpc", door.grpc_target, "--model", "wine",
                                                   "--csv", "rows.csv").splitlines()]
    assert [w["id"] for w in wines] == ["bottle-0", "bottle-70", "bottle-150"]
    assert [w["label"] for w in wines] == ["barolo", "grignolino", "barbera"]  # the CSV's own class names
    shapes = [json.loads(line) for line in gradserve(folder, "predict", "--http", door.http_url, "--model", "shapes",
                                                    "--image", "samples/circle.png", "samples/square.png").splitlines()]
    assert [s["id"] for s in shapes] == ["samples/circle.png", "samples/square.png"]
    assert {s["label"] for s in shapes} <= {"circle", "square"}  # the folder names
    meta = httpx.get(f"{door.http_url}/v2/models/shapes").json()
    assert [t["name"] for t in meta["inputs"]] == ["input", "image"]
    assert json.loads(meta["parameters"]["class_names"]) == ["circle", "square"]
    assert "images" in meta["parameters"]["input_scale"]


def test_a_png_file_and_the_same_image_as_a_tensor_give_the_same_logits(served: tuple[Path, FrontDoor]) -> None:
    folder, door = served
    files = sorted((folder / "data" / "shapes" / "square").glob("*.png"))[:5]
    encoded = np.array([p.read_bytes() for p in files], dtype=object)
    pixels = np.stack([load_image(p.read_bytes(), (16, 16), "RGB") for p in files])  # (5, 3, 16, 16) in [0, 1]

    async def both() -> tuple[dict, dict]:
        async with Client(door.grpc_target) as client:
            return (await client.infer("shapes", encoded, input_name="image"),
                    await client.infer("shapes", pixels, input_name="input"))

    as_files, as_tensor = asyncio.run(both())
    np.testing.assert_allclose(as_files["logits"], as_tensor["logits"], atol=1e-5, rtol=0)
    assert [n.decode() for n in as_files["class_name"]] == [("circle", "square")[i] for i in as_files["label"]]


def test_batch_jobs_over_the_image_folder_and_the_csv(served: tuple[Path, FrontDoor]) -> None:
    folder, door = served
    gradserve(folder, "batch", "--grpc", door.grpc_target, "--model", "shapes", "--input", "data/shapes",
              "--output", "shapes.jsonl")
    rows = [json.loads(line) for line in (folder / "shapes.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and rows[0]["id"] == "circle/0.png"
    assert sum(r["class_name"] == r["id"].split("/")[0] for r in rows) >= 90  # it learnt something
    gradserve(folder, "batch", "--grpc", door.grpc_target, "--model", "wine", "--input", "rows.csv",
              "--output", "wine.jsonl")
    assert [json.loads(line)["id"] for line in (folder / "wine.jsonl").read_text().splitlines()] == \
        ["bottle-0", "bottle-70", "bottle-150"]
    gradserve(folder, "batch", "--local", "store/shapes.mar", "--input", "data/shapes", "--output", "local.jsonl")
    local = [json.loads(line) for line in (folder / "local.jsonl").read_text().splitlines()]
    assert [r["class_name"] for r in local] == [r["class_name"] for r in rows]


def bomb() -> bytes:
    """A PNG that claims 8000 x 6000 pixels (48 M, over the decoder's limit), a few KB on disk."""
    out = io.BytesIO()
    Image.new("L", (8000, 6000)).save(out, "PNG")
    return out.getvalue()


def test_bad_inputs_fail_alone_and_say_what_is_wrong(served: tuple[Path, FrontDoor]) -> None:
    folder, door = served
    good = [p.read_bytes() for p in sorted((folder / "data" / "shapes" / "circle").glob("*.png"))[:6]]
    truncated = good[0][: len(good[0]) // 2]
    bad = {"corrupt": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an image file"),
           "text": (b"just some text", "not an image file"),
           "truncated": (truncated, "corrupt or truncated"),
           "bomb": (bomb(), "over the limit")}

    async def send() -> tuple[list, dict[str, tuple[grpc.StatusCode, str]]]:
        async with Client(door.grpc_target) as client:
            async def one(data: bytes) -> dict | tuple[grpc.StatusCode, str]:
                try:
                    return await client.infer("shapes", np.array([data], dtype=object), input_name="image")
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details() or ""
            answers = await asyncio.gather(*(one(d) for d in [*good, *(b for b, _ in bad.values())]))
            return list(answers[:len(good)]), dict(zip(bad, answers[len(good):], strict=True))

    goods, refused = asyncio.run(send())
    assert all(isinstance(a, dict) and a["class_name"].shape == (1,) for a in goods)  # the rest of the batch
    for name, (code, message) in refused.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, message)
        assert bad[name][1] in message and "image 0 of the request" in message, (name, message)

    wine_meta = httpx.get(f"{door.http_url}/v2/models/wine").json()
    features = len(json.loads(wine_meta["parameters"]["feature_names"]))
    row = {"name": "input", "datatype": "FP32", "shape": [1, features - 1], "data": [1.0] * (features - 1)}
    wrong = httpx.post(f"{door.http_url}/v2/models/wine/infer", json={"inputs": [row]}, timeout=30)
    assert wrong.status_code == 400 and f"[n, {features}]" in wrong.json()["error"]
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="],
             "parameters": {"content_type": "base64"}}
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.5] * 768}
    for inputs in ([image, tensor], []):  # both inputs, or neither
        answer = httpx.post(f"{door.http_url}/v2/models/shapes/infer", json={"inputs": inputs}, timeout=30)
        assert answer.status_code == 400 and "exactly one of" in answer.json()["error"], answer.text
    assert httpx.get(f"{door.http_url}/v2/health/ready", timeout=10).status_code == 200  # still up
