"""`gradserve package`: archive content, manifest, weights digest, fallback refusal, versions."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from run_fixtures import make_run

from gradserve.cli import main as gradserve
from handlers.threads import Threads
from training.package import PackageConfig, PackageRefused, package

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


def fallback_copy(run: Path, where: Path) -> Path:
    """The same run, but its selection fell back (rule_satisfied false)."""
    copy = where / "digits"
    shutil.copytree(run, copy)
    chosen = json.loads((copy / "selection.json").read_text())
    chosen["selection"].update(rule_satisfied=False, eligible=[], reason="fallback: no settled decline")
    (copy / "selection.json").write_text(json.dumps(chosen))
    return copy


def read(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(name)


def test_cli_builds_the_archive_with_the_contract_layout(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    code = gradserve(["package", "--run", str(run), "--model-store", str(store),
                      "--config", str(ROOT / "gradserve.yaml")])
    assert code == 0
    archive = store / "digits.mar"
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert names == {"MAR-INF/MANIFEST.json", "handler.py", "weights.pt", "model-config.yaml", "gradserve.json",
                     "handlers/__init__.py", "handlers/codec.py", "handlers/manifest.py", "handlers/factory.py",
                     "handlers/preprocess.py", "handlers/threads.py", "handlers/sharedmem.py", "handlers/optimize.py",
                     "training/__init__.py", "training/model.py"}
    assert read(archive, "training/__init__.py") == b""
    assert read(archive, "handlers/codec.py") == (ROOT / "handlers/codec.py").read_bytes()
    assert read(archive, "training/model.py") == (ROOT / "training/model.py").read_bytes()
    assert read(archive, "handler.py") == (ROOT / "handlers/handler.py").read_bytes()
    mar = json.loads(read(archive, "MAR-INF/MANIFEST.json"))["model"]
    assert (mar["modelName"], mar["modelVersion"], mar["handler"]) == ("digits", "1.0", "handler.py")
    shipped = yaml.safe_load((ROOT / "gradserve.yaml").read_text())["package"]  # the CLI read this section
    assert yaml.safe_load(read(archive, "model-config.yaml")) == {
        "batchSize": shipped["batch_size"], "maxBatchDelay": shipped["max_batch_delay_ms"],
        "minWorkers": shipped["min_workers"], "maxWorkers": shipped["max_workers"],
        "responseTimeout": shipped["response_timeout_s"],
        "handler": {"torch_threads": shipped["torch_threads"], "parallel_rows": shipped["parallel_rows"],
                    "optimize": shipped["optimize"]}}
    assert (store / "digits-1.0.mar").read_bytes() == archive.read_bytes()


def test_manifest_and_weights(run: Path, tmp_path: Path) -> None:
    archive = package(run, PackageConfig(model_store=str(tmp_path), max_rows=512))
    manifest = json.loads(read(archive, "gradserve.json"))
    chosen = json.loads((run / "selection.json").read_text())
    index = chosen["selection"]["index"]
    assert manifest["format_version"] == 2 and manifest["platform"] == "pytorch_torchserve"
    assert (manifest["name"], manifest["version"], manifest["max_rows"]) == ("digits", "1.0", 512)
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
                                  {"name": "image", "datatype": "BYTES", "shape": [-1]}]  # 8x8 grey image files
    assert [(o["name"], o["datatype"], o["shape"]) for o in manifest["outputs"]] == [
        ("logits", "FP32", [-1, 10]), ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 10]),
        ("class_name", "BYTES", [-1])]
    assert manifest["task"] == "classification" and manifest["code"] == {
        "training/model.py": hashlib.sha256((ROOT / "training/model.py").read_bytes()).hexdigest()}
    assert manifest["labels"] == [str(i) for i in range(10)]
    assert manifest["selection"]["record"] == chosen["records"][index]
    assert manifest["selection"]["step"] == chosen["selection"]["step"]
    assert manifest["rule"] == chosen["rule"] and manifest["baseline_loss"] == chosen["baseline_loss"]
    assert manifest["rule_satisfied"] is True and manifest["allow_fallback"] is False
    checkpoint = torch.load(run / chosen["checkpoints"][index], weights_only=True)
    assert manifest["model_config"] == checkpoint["model_config"]
    assert manifest["training_config"] == checkpoint["config"]

    weights = read(archive, "weights.pt")
    assert manifest["weights"] == {"file": "weights.pt", "sha256": hashlib.sha256(weights).hexdigest()}
    state = torch.load(io.BytesIO(weights), weights_only=True)  # the state_dict only, no optimizer state
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[k], checkpoint["state_dict"][k]) for k in state)


def test_fallback_selection_is_refused_unless_allowed(run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    fallback = fallback_copy(run, tmp_path)
    store = tmp_path / "store"
    assert gradserve(["package", "--run", str(fallback), "--model-store", str(store)]) == 2
    message = capsys.readouterr().err  # a refusal is an error: on stderr
    assert "fell back" in message and "--allow-fallback" in message
    assert not store.exists() or not list(store.iterdir())

    archive = package(fallback, PackageConfig(model_store=str(store)), allow_fallback=True)
    manifest = json.loads(read(archive, "gradserve.json"))
    assert manifest["rule_satisfied"] is False and manifest["allow_fallback"] is True


def test_a_new_version_keeps_the_old_archive(run: Path, tmp_path: Path) -> None:
    package(run, PackageConfig(model_store=str(tmp_path), version="1.0"))
    old = (tmp_path / "digits-1.0.mar").read_bytes()
    package(run, PackageConfig(model_store=str(tmp_path), version="2.0"))
    assert (tmp_path / "digits-1.0.mar").read_bytes() == old
    assert json.loads(read(tmp_path / "digits-1.0.mar", "gradserve.json"))["version"] == "1.0"
    assert json.loads(read(tmp_path / "digits.mar", "gradserve.json"))["version"] == "2.0"
    assert json.loads(read(tmp_path / "digits-2.0.mar", "MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "2.0"
    with pytest.raises(PackageRefused, match="new --version"):
        package(run, PackageConfig(model_store=str(tmp_path), version="1.0"))
    assert (tmp_path / "digits-1.0.mar").read_bytes() == old


# --- a user's own model -------------------------------------------------------------------------------------------

USER_NET = '''
from torch import nn
from mynet.layers import block


def build(in_shape, num_classes):
    return nn.Sequential(block(in_shape[0], 8), nn.Linear(8, num_classes))
'''


def user_run(tmp_path: Path, package_name: str = "mynet", extra: str = "") -> Path:
    """A tiny run of a user's model that lives in a package of its own (two modules), on a table."""
    from sklearn.datasets import load_wine

    from training.config import DataSection, ModelSection, TrainConfig
    from training.train import train

    code = tmp_path / "code"
    (code / package_name).mkdir(parents=True)
    (code / package_name / "__init__.py").write_text(USER_NET.replace("mynet", package_name) + extra)
    (code / package_name / "layers.py").write_text("from torch import nn\n\ndef block(i, o):\n"
                                                   "    return nn.Sequential(nn.Linear(i, o), nn.ReLU())\n")
    wine = load_wine()
    import numpy as np
    np.savez(tmp_path / "wine.npz", x=wine.data, y=wine.target, labels=wine.target_names)
    cfg = TrainConfig(name="wine", runs_dir=str(tmp_path / "runs"), data=DataSection(kind="npz",
                      path=str(tmp_path / "wine.npz")), model=ModelSection(factory=f"{package_name}:build", args={}),
                      code_dir=str(code), epochs=3, eval_every=5, patience=None, threads=1, progress=False)
    return train(cfg)


def test_a_users_package_travels_whole_and_its_code_is_checked(tmp_path: Path) -> None:
    from handlers.local import LocalModel

    archive = package(user_run(tmp_path), PackageConfig(model_store=str(tmp_path / "store")), allow_fallback=True)
    manifest = json.loads(read(archive, "gradserve.json"))
    assert set(manifest["code"]) == {"mynet/__init__.py", "mynet/layers.py"}  # the whole top-level package
    assert manifest["code"]["mynet/layers.py"] == hashlib.sha256(read(archive, "mynet/layers.py")).hexdigest()
    assert manifest["model_config"]["factory"] == "mynet:build" and manifest["model_config"]["in_shape"] == [13]
    assert manifest["labels"] == ["class_0", "class_1", "class_2"] and manifest["task"] == "classification"
    with LocalModel(archive) as model:
        assert model.handler.model[0][0].in_features == 13
    tampered = tmp_path / "tampered.mar"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data + b"\n# edited" if item.filename == "mynet/layers.py" else data)
    with pytest.raises(RuntimeError, match="mynet/layers.py has sha256 .* refusing model code that were altered"):
        LocalModel(tampered)


def test_the_archive_carries_the_code_the_run_was_trained_with(tmp_path: Path) -> None:
    """The run keeps a copy of the model code: edited, or gone (the run moved to another machine), the code beside
    the config is not what the archive ships."""
    import shutil

    run = user_run(tmp_path)
    trained = (tmp_path / "code" / "mynet" / "layers.py").read_bytes()
    assert (run / "code" / "mynet" / "layers.py").read_bytes() == trained
    (tmp_path / "code" / "mynet" / "layers.py").write_text("raise ImportError('edited after training')\n")
    moved = tmp_path / "elsewhere" / "wine"
    shutil.move(run, moved)
    shutil.rmtree(tmp_path / "code")
    archive = package(moved, PackageConfig(model_store=str(tmp_path / "store")), allow_fallback=True)
    assert read(archive, "mynet/layers.py") == trained


@pytest.mark.parametrize(("name", "words"), [
    ("torch", "shadows 'torch' that the serving environment already has"),  # site-packages
    ("psutil", "shadows 'psutil' that the serving environment already has"),
    ("json", "which the serving environment already has"),  # the standard library
    ("handlers", "which the serving environment already has"),  # the archive's own package
])
def test_a_module_that_shadows_the_serving_environment_is_refused(tmp_path: Path, name: str, words: str) -> None:
    from gradserve.errors import UsageError
    from handlers.factory import ModelSpec
    from training.model_code import stage_model_code

    (tmp_path / "code" / name).mkdir(parents=True)
    (tmp_path / "code" / name / "__init__.py").write_text("def build(in_shape, num_classes): ...\n")
    with pytest.raises(UsageError, match=words):
        stage_model_code(ModelSpec(f"{name}:build", (3,), 2), str(tmp_path / "code"), tmp_path / "stage")


def test_an_archive_that_does_not_load_in_a_clean_interpreter_is_refused(tmp_path: Path) -> None:
    # The factory imports a module that sits beside the config, outside its package: the archive lacks it.
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "sidecar.py").write_text("WIDTH = 8\n")
    run = user_run(tmp_path, extra="\nimport sidecar  # noqa: F401, E402\n")
    from gradserve.errors import UsageError

    with pytest.raises(UsageError, match="clean interpreter.*No module named 'sidecar'"):
        package(run, PackageConfig(model_store=str(tmp_path / "store")), allow_fallback=True)
    assert not list((tmp_path / "store").glob("*.mar")) if (tmp_path / "store").exists() else True


def test_workers_are_a_count_or_one_per_core(run: Path, tmp_path: Path) -> None:
    for refused in ((0, 2), (2, 1), (-1, 1)):
        with pytest.raises(ValueError, match="or both 0 .one worker per core"):
            PackageConfig(min_workers=refused[0], max_workers=refused[1])
    archive = package(run, PackageConfig(model_store=str(tmp_path), min_workers=0, max_workers=0, torch_threads=0))
    shipped = yaml.safe_load(read(archive, "model-config.yaml"))
    assert "minWorkers" not in shipped and "maxWorkers" not in shipped  # TorchServe's default: one per core
    assert Threads.from_config(shipped).most == 1  # a core each: big calls on one thread, not on all cores each
    assert Threads.from_config({**shipped, "maxWorkers": 1}).most == len(os.sched_getaffinity(0))
