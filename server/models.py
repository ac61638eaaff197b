"""The model registry: what each archive in the model store serves, read from its gradserve.json manifest.

A .mar is a zip; the manifest says the model's name, version, input and output tensors, labels and the
selection record. The front door validates requests against it and answers ModelMetadata from it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "gradserve.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch dimension)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_rows: int
    labels: tuple[str, ...] = ()
    # Flat scalar properties for ModelMetadata: the selection record, rule, weights' sha256.
    properties: dict[str, str | int | float | bool] = field(default_factory=dict)
    archive: str = ""

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]


def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(archive) as zf:
            return json.loads(zf.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ValueError(f"{archive} is not a gradserve archive with a valid {MANIFEST}: {e}") from None


def model_info(manifest: dict[str, Any], archive: str = "") -> ModelInfo:
    def specs(key: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in manifest[key])

    inputs = specs("inputs")
    if len(inputs) != 1:
        raise ValueError(f"model {manifest['name']!r} declares {len(inputs)} inputs; the front door serves one")
    return ModelInfo(
        name=manifest["name"],
        version=str(manifest.get("version", "1")),
        platform=manifest.get("platform", "pytorch_torchserve"),
        inputs=inputs,
        outputs=specs("outputs"),
        max_rows=int(manifest.get("max_rows", 1024)),
        labels=tuple(manifest.get("labels", ())),
        properties=_properties(manifest),
        archive=archive,
    )


def _properties(manifest: dict[str, Any]) -> dict[str, str | int | float | bool]:
    selection = manifest.get("selection") or {}
    record = selection.get("record") or {}
    props: dict[str, Any] = {f"selection.{k}": v for k, v in selection.items() if k != "record"}
    props.update({f"record.{k}": v for k, v in record.items()})
    props.update({f"rule.{k}": v for k, v in (manifest.get("rule") or {}).items()})
    for key in ("baseline_loss", "rule_satisfied", "allow_fallback", "input_scale"):
        if key in manifest:
            props[key] = manifest[key]
    props["weights_sha256"] = (manifest.get("weights") or {}).get("sha256", "")
    props["labels"] = ",".join(manifest.get("labels", ()))
    return {k: v for k, v in props.items() if isinstance(v, str | int | float | bool)}


def load_registry(model_store: Path) -> dict[str, ModelInfo]:
    """The ModelInfo of each model in the store, by name."""
    registry: dict[str, ModelInfo] = {}
    for archive in sorted(Path(model_store).glob("*.mar")):
        info = model_info(read_manifest(archive), str(archive))
        # `gradserve package` writes <name>-<version>.mar and its copy <name>.mar, the latest: serve that one.
        if info.name not in registry or archive.stem == info.name:
            registry[info.name] = info
    return registry
