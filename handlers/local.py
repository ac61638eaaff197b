"""An archive's own handler run in this process, as TorchServe runs it, for `gradserve batch --local`, the bench
and tests: unpack the .mar, hand the handler a TorchServe-like context, call `handle` with raw payloads.

    with LocalModel(Path("model_store/digits.mar")) as model:
        (answer,) = model.handle([codec.encode({"input": x})])
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any

import yaml

from handlers.handler import GradserveHandler
from handlers.manifest import Manifest


def context(model_dir: Path, max_workers: int = 1, gpu_id: int | None = None, batch_size: int = 1,
            handler_settings: dict[str, Any] | None = None) -> SimpleNamespace:
    """What TorchServe hands `initialize` and `handle`: the model folder, the device, model-config.yaml (its
    `handler` settings are the archive's unless `handler_settings` replaces them)."""
    if handler_settings is None:
        packaged = model_dir / "model-config.yaml"
        handler_settings = (yaml.safe_load(packaged.read_text()) or {}).get("handler") if packaged.exists() else None
    return SimpleNamespace(
        system_properties={"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": batch_size},
        model_yaml_config={"maxWorkers": max_workers, **({"handler": handler_settings} if handler_settings else {})},
        manifest={}, metrics=None)


def unpack(archive: Path, into: Path) -> Path:
    """The archive's files in `into`, as TorchServe extracts them into a model folder."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(into)
    return into


class LocalModel:
    """The handler of `archive`, initialised in a temporary model folder that lives as long as this object."""

    def __init__(self, archive: Path, max_workers: int = 1) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gradserve-local-")
        model_dir = unpack(archive, Path(self._dir.name))
        self.manifest = Manifest.read(model_dir)
        self.context = context(model_dir, max_workers=max_workers)
        self.handler = GradserveHandler()
        try:
            self.handler.initialize(self.context)
        except BaseException:
            self._dir.cleanup()
            raise

    def handle(self, payloads: list[bytes]) -> list[bytes]:
        """One handler call, as TorchServe makes it for a batch of requests."""
        return self.handler.handle([{"data": p} for p in payloads], self.context)

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
