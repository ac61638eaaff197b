"""The model contract: a factory named "module:callable" returns an nn.Module; training and the handler rebuild
the same module from the same `ModelSpec` (saved in every checkpoint and in the archive's manifest).

The factory is called with its `args`, plus `in_shape` (a tuple: (C, H, W) for images, (F,) for tables) and
`num_classes` (classes, or regression targets) when its signature names them or takes **kwargs. The built-in
ConvNet is one such factory: "training.model:build_convnet". This file ships inside every archive.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

BUILTIN = "training.model:build_convnet"


class FactoryError(ValueError):
    """The factory cannot be imported or called, or did not return a module; the message names it."""


@dataclass(frozen=True)
class ModelSpec:
    factory: str
    in_shape: tuple[int, ...]
    num_classes: int  # classes, or regression targets
    args: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return call_factory(import_factory(self.factory), self.args, self.in_shape, self.num_classes, self.factory)

    @property
    def module(self) -> str:
        return self.factory.partition(":")[0]

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "args": dict(self.args), "in_shape": list(self.in_shape),
                "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(str(d["factory"]), tuple(int(v) for v in d["in_shape"]), int(d["num_classes"]),
                   dict(d.get("args") or {}))


def forget_foreign(factories: tuple[str | None, ...], folder: Path) -> None:
    """Make the factories' top-level modules import from `folder`: a module of the same name imported earlier
    from elsewhere (another user's folder or archive, in a process that handles several) is forgotten."""
    folder = folder.resolve()
    for top in {f.partition(":")[0].split(".")[0] for f in factories if f}:
        where = getattr(sys.modules.get(top), "__file__", None)
        if where and folder not in Path(where).resolve().parents:
            for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
                del sys.modules[name]


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable named by "module:callable" (a dotted attribute path after the colon is followed)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise FactoryError(f"model factory {spec!r} must be written 'module:callable', e.g. 'net:build'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises while it is imported
        raise FactoryError(f"cannot import the module of the factory {spec!r}: {type(e).__name__}: {e}") from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise FactoryError(f"factory {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise FactoryError(f"factory {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def call_factory(fn: Callable[..., Any], args: dict[str, Any], in_shape: tuple[int, ...], num_classes: int,
                 name: str = "") -> nn.Module:
    """fn(**args), with in_shape and num_classes when its signature names them (or takes **kwargs)."""
    kwargs = dict(args)
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in (("in_shape", tuple(in_shape)), ("num_classes", num_classes)):
        if key in parameters or open_ended:
            kwargs.setdefault(key, value)
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the user's factory raises
        raise FactoryError(f"calling the model factory {name or fn!r} with {sorted(kwargs)} failed: "
                           f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"the model factory {name or fn!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
