"""What a served model takes and answers, as a client learns it from ModelMetadata (gRPC or REST) or, for a
local run, from the archive's manifest: its input rows' shape, whether it takes image files, its task, its
class or target names and its feature names. `gradserve predict` and batch jobs shape their requests by it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from handlers.manifest import Manifest


@dataclass(frozen=True)
class ModelContract:
    name: str
    row_shape: tuple[int, ...]  # of the FP32 `input`: (C, H, W) or (F,)
    takes_images: bool  # it also takes `image`: one encoded file per row
    task: str  # classification | regression
    names: tuple[str, ...]  # class names (classification) or target names (regression)
    feature_names: tuple[str, ...]  # tables: the columns a row holds, in order

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs a client asks for: what a person reads, and the scores."""
        return ("prediction",) if self.task == "regression" else ("logits", "probabilities", "class_name")

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ModelContract:
        """From ModelMetadata as JSON (REST's body; gRPC's response through `metadata_dict`)."""
        inputs = {t["name"]: t for t in meta["inputs"]}
        params = meta.get("parameters") or {}
        task = str(params.get("task", "classification"))
        names = params.get("class_names" if task == "classification" else "target_names")
        return cls(
            name=meta["name"], row_shape=tuple(int(d) for d in inputs["input"]["shape"][1:]),
            takes_images="image" in inputs, task=task,
            names=tuple(json.loads(names)) if names else tuple(str(params.get("labels", "")).split(",")),
            feature_names=tuple(json.loads(params.get("feature_names") or "[]")))

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelContract:
        return cls(name=manifest.name, row_shape=manifest.inputs[0].row_shape,
                   takes_images=any(s.name == "image" for s in manifest.inputs), task=manifest.task,
                   names=manifest.labels, feature_names=tuple(manifest.preprocess.get("feature_names", ())))


def metadata_dict(response: Any) -> dict[str, Any]:
    """A gRPC ModelMetadataResponse as REST's JSON (parameters by their set field)."""
    def value(p: Any) -> Any:
        field = p.WhichOneof("parameter_choice")
        return getattr(p, field) if field else None

    return {"name": response.name,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.outputs],
            "parameters": {k: value(v) for k, v in response.parameters.items()}}
