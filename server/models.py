"""What the model store holds: every archive (.mar) read by its manifest (gradserve.json), grouped by model name
and version. `<name>-<version>.mar` files are versions of `<name>`; `<name>.mar`, the copy `gradserve package`
keeps of the latest build, is the same archive and counts once. An archive that cannot be read (a corrupt zip,
no manifest, a TorchServe name other than its manifest's) is kept with its reason, so that its model is reported
unready instead of stopping the others.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from handlers.manifest import Manifest, ManifestError
from server.torchserve.process import archive_entry


@dataclass(frozen=True)
class Archive:
    path: Path
    sha256: str  # of the file: two copies of one build are one archive
    manifest: Manifest | None  # None when it cannot be read
    problem: str = ""  # why it cannot be served
    workers: int = 1  # TorchServe workers it runs on (package.min_workers)

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else re.sub(r"-[^-]*$", "", self.path.stem)

    @property
    def version(self) -> str:
        return self.manifest.version if self.manifest else "?"

    @property
    def internal_name(self) -> str:
        """The name TorchServe knows this archive by: unique per build, so that a new build of a version can load
        beside the old one and take over its traffic without a gap."""
        return f"{self.name}--{self.version}--{self.sha256[:12]}"


def read_archive(path: Path) -> Archive:
    """The archive at `path`; OSError when the file cannot be read (removed while we looked)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return _archive(path, digest.hexdigest())


def _archive(path: Path, digest: str) -> Archive:
    try:
        manifest = Manifest.from_archive(path)
        registered, workers = archive_entry(path)
    except (ManifestError, OSError, KeyError, ValueError, yaml.YAMLError) as e:
        return Archive(path, digest, None, f"{path.name} is not a gradserve archive ({e}); repackage it")
    if registered != manifest.name:
        return Archive(path, digest, None, f"{path.name}: TorchServe registers it as {registered!r} but its "
                                           f"gradserve.json names {manifest.name!r}; repackage it")
    return Archive(path, digest, manifest, workers=workers)


def scan(store: Path, known: dict[Path, tuple[float, int, Archive]] | None = None, settle_s: float = 0.0
         ) -> tuple[dict[tuple[str, str], Archive], dict[Path, tuple[float, int, Archive]]]:
    """The store's archives by (name, version), and the files as read (mtime, size, archive). `known` is the last
    scan's files: a file whose mtime and size did not change is not read again, and one changed less than
    `settle_s` ago (it may still be being copied in) is taken as it was, or not yet."""
    known = known or {}
    files: dict[Path, tuple[float, int, Archive]] = {}
    now = time.time()
    for path in sorted(Path(store).glob("*.mar")):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed while we looked
        seen = known.get(path)
        if now - stat.st_mtime < settle_s:
            if seen is not None:
                files[path] = seen
            continue
        if seen is not None and seen[:2] == (stat.st_mtime, stat.st_size):
            files[path] = seen
        else:
            try:
                files[path] = (stat.st_mtime, stat.st_size, read_archive(path))
            except OSError:
                continue  # removed (or unreadable) while we looked: the next scan sees it as it is then
    found: dict[tuple[str, str], Archive] = {}
    for path, (_, _, archive) in files.items():
        key = (archive.name, archive.version)
        # <name>-<version>.mar and its copy <name>.mar: one archive; the versioned file names it.
        if key not in found or path.stem != archive.name:
            found[key] = archive
    return found, files


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Versions in the order people mean: 1.9 < 1.10 < 2.0 (numbers as numbers, the rest as text)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-_+]", version) if part)
