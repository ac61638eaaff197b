"""gradserve.yaml: one section per stage. Each stage owns a frozen dataclass; this module only reads
the file and turns a section (plus command-line overrides) into that dataclass, rejecting unknown keys."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"config file {path} does not exist; pass --config with the path of gradserve.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path} must hold a mapping of sections (train:, package:, serve:, ...)")
    return data


def build(cls: type[T], section: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> T:
    """cls(**section) with overrides applied (None values are ignored), unknown keys refused by name."""
    values = dict(section or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        if hints.get(name) is tuple or typing.get_origin(hints.get(name)) is tuple:
            values[name] = tuple(value)
    return cls(**values)
