"""The model registry: what each archive in the model store serves, read from its manifest (gradserve.json).

The front door validates requests against the manifest and answers ModelMetadata from it; TorchServe loads the
archive files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradserve.errors import UsageError
from handlers.manifest import Manifest, ManifestError
from server.torchserve.process import archive_model_name


@dataclass(frozen=True)
class ServedModel:
    manifest: Manifest
    archive: Path


def load_registry(model_store: Path) -> dict[str, ServedModel]:
    """The model each archive in the store serves, by name. Refuses (saying what to do) an empty store, an
    archive that is not a gradserve archive, and one whose TorchServe name differs from its manifest's."""
    registry: dict[str, ServedModel] = {}
    for archive in sorted(Path(model_store).glob("*.mar")):
        try:
            manifest = Manifest.from_archive(archive)
        except ManifestError as e:
            raise UsageError(f"{e}; remove it from {model_store} or repackage it") from None
        registered = archive_model_name(archive)
        if registered != manifest.name:
            raise UsageError(f"{archive}: TorchServe registers it as {registered!r} but its gradserve.json names "
                             f"{manifest.name!r}; repackage it")
        # `gradserve package` writes <name>-<version>.mar and its copy <name>.mar, the latest: serve that one.
        if manifest.name not in registry or archive.stem == manifest.name:
            registry[manifest.name] = ServedModel(manifest, archive)
    if not registry:
        raise UsageError(f"no .mar archive in {model_store}: build one with `gradserve package`")
    return registry
