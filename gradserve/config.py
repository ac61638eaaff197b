"""gradserve.yaml: one section per stage (train, package, serve, batch, bench). Each stage owns a frozen
dataclass; this module is the one loader every command uses to turn its section, the environment and its
flags into that dataclass.

Precedence, highest first: command-line flags, the environment (fields declared with `env_field`, such as
the bearer token from GRADSERVE_TOKEN), the file, the dataclass defaults. Nested dataclasses are built from
nested mappings, and flags may name nested fields with dotted keys ("listen.host"). Unknown keys are refused
by their dotted name. Relative paths written in the file (fields declared with `path_field`) resolve against
the file's folder, so a config works from wherever it is run; paths given as flags resolve against the
current folder, as a shell user expects.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gradserve.errors import ConfigError

T = TypeVar("T")

ENV_TOKEN = "GRADSERVE_TOKEN"  # the bearer token of the front door, for `serve`, `run`, `predict` and `batch`
DEFAULT_FILE = "gradserve.yaml"


def env_field(variable: str, default: Any = None) -> Any:
    """A field the environment variable `variable` sets when no flag does (it beats the file)."""
    return dataclasses.field(default=default, metadata={"env": variable})


def path_field(default: Any = None) -> Any:
    """A path that, written relative in the config file, is relative to the file's folder."""
    return dataclasses.field(default=default, metadata={"path": True})


def default_path(path: str | Path | None) -> Path | None:
    """The config file to read: `path` when given, else ./gradserve.yaml when it exists, else none."""
    if path is not None:
        return Path(path)
    return Path(DEFAULT_FILE) if Path(DEFAULT_FILE).exists() else None


def load_file(path: str | Path | None) -> dict[str, Any]:
    """The file's sections; {} for no file. os.devnull reads as an empty file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass --config with the path of gradserve.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (train:, package:, serve:, ...)")
    return data


def load(cls: type[T], path: str | Path | None, section: str, overrides: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None) -> T:
    """`cls` from the `section` of the config file at `path` (None: no file), the environment and `overrides`."""
    base = Path(path).resolve().parent if path is not None and Path(path).name != os.devnull else None
    return build(cls, load_file(path).get(section), overrides, env, base=base, where=f"{section}:")


def build(cls: type[T], section: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
          env: Mapping[str, str] | None = None, base: Path | None = None, where: str = "") -> T:
    """cls(**section) with the environment and `overrides` (None values are ignored) applied on top."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of settings, got {section!r}")
    values = _resolve_paths(cls, dict(section or {}), base)
    _apply_env(cls, values, os.environ if env is None else env)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(values, key.split("."), value)
    return _construct(cls, values, where or cls.__name__)


def _construct(cls: type[T], values: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        nested = _dataclass_of(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            values[name] = _construct(nested, dict(value), f"{where}{name}.")
        elif _is_tuple(hints.get(name)) and isinstance(value, list | tuple):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.:') or cls.__name__}: {e}") from None


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), else None."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    found = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
    return found[0] if found else None


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def _set_dotted(values: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        inner = values.get(key)
        values[key] = dict(inner) if isinstance(inner, Mapping) else {}
        values = values[key]
    values[keys[-1]] = value


def _apply_env(cls: type, values: dict[str, Any], env: Mapping[str, str]) -> None:
    """Fields declared with `env_field`, at any depth, take their variable's value when it is set."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (variable := f.metadata.get("env")) and env.get(variable):
            values[f.name] = env[variable]
        nested, current = _dataclass_of(hints.get(f.name)), values.get(f.name, {})
        if nested is not None and isinstance(current, Mapping):
            inner = dict(current)
            _apply_env(nested, inner, env)
            if inner:
                values[f.name] = inner


def _resolve_paths(cls: type, values: dict[str, Any], base: Path | None) -> dict[str, Any]:
    if base is None:
        return values
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if f.metadata.get("path") and isinstance(value, str) and value and not Path(value).is_absolute():
            values[f.name] = str(base / value)
        nested = _dataclass_of(hints.get(f.name))
        if nested is not None and isinstance(value, Mapping):
            values[f.name] = _resolve_paths(nested, dict(value), base)
    return values
