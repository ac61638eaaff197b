"""The archive's manifest, `gradserve.json`: the one contract between packaging, the handler, the front door,
batch jobs and the bench.

`gradserve package` writes it (`Manifest.write`); the handler reads it from its model folder and the front door
from the archive itself (`Manifest.read`, `Manifest.from_archive`); both validate a request's rows with the
same `validate_rows`, so a caller hears the same words from either side. It ships inside every archive, so it
imports only the standard library, numpy and the codec beside it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlers import codec

FILE = "gradserve.json"
FORMAT_VERSION = 2  # 2: any model's factory, its preprocessing, task, code files


class ManifestError(ValueError):
    """The archive has no manifest, or one this code cannot read."""


class InvalidRows(ValueError):
    """A request's tensors do not fit the model's input contract; the message says what would."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # an Open Inference Protocol datatype: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]  # -1: any size (the first dimension is the rows)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def describe(self) -> str:
        dims = ", ".join(["n", *map(str, self.row_shape)])
        return f"{self.datatype} {self.name!r} of shape [{dims}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class Manifest:
    """What an archive serves, how it was chosen, and what it carries (ARCHITECTURE.md, "Archive")."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights_file: str
    weights_sha256: str
    max_rows: int = 1024
    labels: tuple[str, ...] = ()  # class names (classification) or target names (regression)
    platform: str = "pytorch_torchserve"
    input_scale: str = ""  # the input contract in words (handlers/preprocess.py's Preprocess.describe)
    model_config: dict[str, Any] = field(default_factory=dict)  # rebuilds the module
    selection: dict[str, Any] = field(default_factory=dict)  # the rule's choice, with its record
    rule: dict[str, Any] = field(default_factory=dict)
    baseline_loss: float | None = None  # the untrained model's validation loss
    rule_satisfied: bool = True
    allow_fallback: bool = False
    training_config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the checkpoint the weights came from
    tasks: tuple[dict[str, Any], ...] = ()  # multi-task models: what each output predicts
    task: str = "classification"  # classification | regression
    preprocess: dict[str, Any] = field(default_factory=dict)  # handlers/preprocess.py's Preprocess, as a dict
    code: dict[str, str] = field(default_factory=dict)  # the model's code files in the archive -> sha256
    forward_rows: int = 0  # the handler forwards larger batches in chunks of this many rows (0: all at once)
    payload_refs: bool = False  # the handler reads large requests from shared memory (handlers/sharedmem.py)
    format_version: int = FORMAT_VERSION

    # --- reading and writing ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "platform": self.platform, "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs], "labels": list(self.labels), "max_rows": self.max_rows,
            "input_scale": self.input_scale, "selection": self.selection, "rule": self.rule,
            "baseline_loss": self.baseline_loss, "rule_satisfied": self.rule_satisfied,
            "allow_fallback": self.allow_fallback,
            "weights": {"file": self.weights_file, "sha256": self.weights_sha256},
            "model_config": self.model_config, "training_config": self.training_config, "source": self.source,
            "task": self.task, "preprocess": self.preprocess, "code": self.code, "forward_rows": self.forward_rows,
            "payload_refs": self.payload_refs,
        }
        if self.tasks:
            d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        try:
            if int(d.get("format_version", FORMAT_VERSION)) != FORMAT_VERSION:
                raise ManifestError(f"manifest format_version {d['format_version']} is not {FORMAT_VERSION}; "
                                    "repackage the run with this gradserve")
            weights = d["weights"]
            return cls(
                name=str(d["name"]), version=str(d.get("version", "1")),
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                weights_file=str(weights["file"]), weights_sha256=str(weights["sha256"]),
                max_rows=int(d.get("max_rows", 1024)), labels=tuple(str(x) for x in d.get("labels", ())),
                platform=str(d.get("platform", "pytorch_torchserve")), input_scale=str(d.get("input_scale", "")),
                model_config=dict(d.get("model_config") or {}), selection=dict(d.get("selection") or {}),
                rule=dict(d.get("rule") or {}), baseline_loss=_optional_float(d.get("baseline_loss")),
                rule_satisfied=bool(d.get("rule_satisfied", True)), allow_fallback=bool(d.get("allow_fallback")),
                training_config=dict(d.get("training_config") or {}), source=dict(d.get("source") or {}),
                tasks=tuple(d.get("tasks") or ()), task=str(d.get("task", "classification")),
                preprocess=dict(d.get("preprocess") or {}),
                code={str(k): str(v) for k, v in (d.get("code") or {}).items()},
                forward_rows=int(d.get("forward_rows", 0)), payload_refs=bool(d.get("payload_refs", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{FILE} is missing or has a malformed entry ({type(e).__name__}: {e}); "
                                "repackage the run") from None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        """The manifest of an unpacked archive (TorchServe's model_dir)."""
        try:
            return cls.from_dict(json.loads((Path(model_dir) / FILE).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{model_dir} has no readable {FILE}: {e}") from None

    @classmethod
    def from_archive(cls, archive: Path) -> Manifest:
        """The manifest of a .mar file, read without unpacking it."""
        try:
            with zipfile.ZipFile(archive) as zf:
                return cls.from_dict(json.loads(zf.read(FILE)))
        except (OSError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
            raise ManifestError(f"{archive} is not a gradserve archive with a valid {FILE}: {e}") from None

    # --- what callers ask of it ------------------------------------------------------------------------------

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def properties(self) -> dict[str, str | int | float | bool]:
        """Flat scalar properties for ModelMetadata: the selection record, the rule, the weights' sha256."""
        record = self.selection.get("record") or {}
        props: dict[str, Any] = {f"selection.{k}": v for k, v in self.selection.items() if k != "record"}
        props.update({f"record.{k}": v for k, v in record.items()})
        props.update({f"rule.{k}": v for k, v in self.rule.items()})
        props.update({"baseline_loss": self.baseline_loss, "rule_satisfied": self.rule_satisfied,
                      "allow_fallback": self.allow_fallback, "weights_sha256": self.weights_sha256,
                      "labels": ",".join(self.labels), "task": self.task,
                      # lists as JSON text: a name may hold a comma
                      "class_names" if self.task == "classification" else "target_names": json.dumps(self.labels),
                      "feature_names": json.dumps(self.preprocess.get("feature_names", []))})
        if self.input_scale:
            props["input_scale"] = self.input_scale  # the input contract in words
        return {k: v for k, v in props.items() if isinstance(v, str | int | float | bool)}


def validate_rows(manifest: Manifest, tensors: Mapping[str, np.ndarray],
                  max_rows: int | None = None) -> tuple[str, np.ndarray]:
    """(input name, rows) of a request that carries exactly one of the model's inputs and nothing else, or
    InvalidRows saying what the model takes. `max_rows` may lower the manifest's limit (the front door's own).
    A BYTES input is a 1-D object array of non-empty `bytes` (one encoded file per row), checked here for its
    form only: the handler decodes it."""
    limit = min(manifest.max_rows, max_rows or manifest.max_rows)

    def refused(got: str) -> InvalidRows:  # the message is built only for a request that is refused
        choices = " or ".join(s.describe() for s in manifest.inputs)
        expected = f"{'one' if len(manifest.inputs) == 1 else 'exactly one of'} {choices}, with 1 <= n <= {limit}"
        expected += " and finite values" if any(s.datatype != "BYTES" for s in manifest.inputs) else ""
        return InvalidRows(f"model {manifest.name!r} takes {expected}; {got}")

    specs = {s.name: s for s in manifest.inputs}
    if len(tensors) != 1 or next(iter(tensors)) not in specs:
        raise refused(f"got tensors {sorted(tensors)}")
    ((name, x),) = tensors.items()
    spec = specs[name]
    dtype = np.dtype(object) if spec.datatype == "BYTES" else codec.DATATYPES.get(spec.datatype)
    if x.dtype != dtype or x.ndim != len(spec.shape) or x.shape[1:] != spec.row_shape:
        raise refused(f"got {_datatype(x.dtype)} {list(x.shape)}")
    if not 1 <= len(x) <= limit:
        raise refused(f"got n = {len(x)}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise refused("got NaN or infinite values")
    if x.dtype == object and not all(isinstance(v, bytes) and v for v in x):
        raise refused(f"input {name!r} has an empty element or one that is not bytes")
    return name, x


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _datatype(dtype: np.dtype) -> str:
    if np.dtype(dtype).kind == "O":
        return "BYTES"
    try:
        return codec.datatype_of(dtype)
    except codec.CodecError:
        return str(dtype)
