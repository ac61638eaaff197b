"""The README's examples, end to end, with the README's own commands: each example (in a copy of examples/)
builds its data, trains, and packages beside the digits demo; one `gradserve serve` serves all four; the
README's predict, tritonclient, curl and batch commands answer, and their answers equal the training code's
own model on the same inputs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from common import ROOT
from frontdoor_fixtures import built_store

from bench.stacks import FrontDoor, running_front_door

pytestmark = pytest.mark.slow

EXAMPLES = ("tabular", "images", "regression")
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GRADSERVE_TOKEN": ""}

# The training code's model of a run's selected checkpoint, on rows or image files; run in a process of its
# own, with the example's folder on the path (every example's model module is called net.py).
REFERENCE = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from handlers.factory import ModelSpec
from handlers.preprocess import Preprocess
from training import checkpoint
from training.summary import read_selection
example, run, task = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, str(example))
doc = read_selection(run)
ckpt = checkpoint.load(run / doc["checkpoints"][doc["selection"]["index"]])
model = ModelSpec.from_dict(ckpt["model_config"]).build()
model.load_state_dict(ckpt["state_dict"])
model.eval()
pre = Preprocess.from_dict(ckpt["data"]["preprocess"])
x = torch.from_numpy(np.load(sys.argv[4]))
with torch.no_grad():
    out = model(pre.standardize(x))
    out = pre.unstandardize_target(out) if task == "regression" else out
print(json.dumps({"out": out.tolist(), "labels": ckpt["data"]["labels"]}))
"""


def readme_block(heading: str, index: int) -> list[str]:
    """The command lines of the `index`-th ```sh block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    block = re.findall(r"```sh\n(.*?)```", after, flags=re.S)[index]
    return [line for line in block.splitlines() if line.strip() and not line.startswith(("#", "export "))]


def shell(command: str, cwd: Path) -> str:
    done = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV,
                          executable="/bin/bash")
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FrontDoor]]:
    """A copy of the examples, each built, trained and packaged with the README's commands, served beside the
    digits demo."""
    root = tmp_path_factory.mktemp("checkout")
    for name in EXAMPLES:
        shutil.copytree(ROOT / "examples" / name, root / "examples" / name,
                        ignore=shutil.ignore_patterns("data", "runs", "samples", "rows.csv", "__pycache__"))
    (root / "model_store").mkdir()
    shutil.copy(built_store(tmp_path_factory).path / "digits.mar", root / "model_store" / "digits.mar")
    for command in readme_block("### Examples", 0):
        shell(command, root)
    with running_front_door(root / "model_store", root / "serve", None) as door:
        yield root, door


def served_commands(door: FrontDoor) -> list[str]:
    return [c.replace("127.0.0.1:8001", door.grpc_target).replace("http://127.0.0.1:8000", door.http_url)
            for c in readme_block("### Examples", 1)]


def reference(root: Path, example: str, run: str, task: str, x: np.ndarray) -> dict:
    np.save(root / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(root / "examples" / example),
                           str(root / "examples" / example / "runs" / run), task, str(root / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def table_rows(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    return np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]], dtype=np.float32)


def test_every_example_is_served_beside_the_demo(served: tuple[Path, FrontDoor]) -> None:
    root, door = served
    ready = httpx.get(f"{door.http_url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200
    for model in ("digits", "cancer", "digits-rgb", "diabetes"):
        meta = httpx.get(f"{door.http_url}/v2/models/{model}", timeout=10).json()
        assert meta["name"] == model, meta
    commands = served_commands(door)
    assert len(commands) == 6


def test_the_readme_predictions_equal_the_training_models(served: tuple[Path, FrontDoor]) -> None:
    root, door = served
    cancer, diabetes, images, triton, curl, batch = served_commands(door)

    lines = [json.loads(line) for line in shell(cancer, root).splitlines()]
    rows = table_rows(root / "examples" / "tabular" / "rows.csv")
    truth = reference(root, "tabular", "cancer", "classification", rows)
    assert [line["id"] for line in lines] == [f"patient-{i}" for i in (0, 1, 19, 20, 21)]
    assert [line["label"] for line in lines] == [truth["labels"][int(np.argmax(o))] for o in truth["out"]]

    lines = [json.loads(line) for line in shell(diabetes, root).splitlines()]
    truth = reference(root, "regression", "diabetes", "regression",
                      table_rows(root / "examples" / "regression" / "rows.csv"))
    np.testing.assert_allclose([line["prediction"]["progression"] for line in lines],
                               [o[0] for o in truth["out"]], rtol=1e-4)

    from handlers.preprocess import load_image

    samples = [root / "examples" / "images" / "samples" / f"{n}.png" for n in ("zero", "seven")]
    pixels = np.stack([load_image(p.read_bytes(), (32, 32), "RGB") for p in samples])
    truth = reference(root, "images", "digits-rgb", "classification", pixels)
    names = [truth["labels"][int(np.argmax(o))] for o in truth["out"]]
    assert [json.loads(line)["label"] for line in shell(images, root).splitlines()] == names
    assert shell(triton, root).split(": ")[1].split(" ")[0] == names[0]
    answer = json.loads(shell(curl, root))
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["class_name"]["data"] == [names[0]]
    np.testing.assert_allclose(outputs["probabilities"]["data"],
                               np.exp(truth["out"][0]) / np.exp(truth["out"][0]).sum(), atol=1e-5)
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(samples[1].read_bytes()).decode()]}]}
    second = httpx.post(f"{door.http_url}/v2/models/digits-rgb/infer", json=body, timeout=30).json()
    logits = {o["name"]: o for o in second["outputs"]}["logits"]["data"]
    np.testing.assert_allclose(logits, truth["out"][1], atol=1e-4)

    shell(batch, root)
    predicted = [json.loads(line) for line in Path("/tmp/digits-rgb.jsonl").read_text().splitlines()]
    assert len(predicted) == 1797 and all(r["class_name"] in truth["labels"] for r in predicted)
    right = sum(r["class_name"] == r["id"].split("/")[0] for r in predicted)
    assert right / len(predicted) > 0.8, right
