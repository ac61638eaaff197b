"""Large request payloads by reference: the front door writes the codec message to a file on a memory-backed
filesystem (/dev/shm) and sends TorchServe only a small message naming it; the handler maps the file.

Why: TorchServe copies every byte of a request through its JVM (gRPC or HTTP in, its worker protocol out) and its
Python worker reads it back from a socket; for a 256-row 3x64x64 request (12 MiB) that cost more CPU than the front
door and the forward's own overhead together (`gradserve bench`, README "Performance"). The front door starts
TorchServe itself, so the two always share a host and its /dev/shm.

The front door owns the files: one private directory per front-door process (mode 0700, files 0600), a file per
call in flight; a directory whose process is gone is removed at the next start. When a call returns, its file is
kept for the next payload of exactly its size (at most KEEP_IDLE_BYTES of idle files), else removed: writing into
a file tmpfs already holds cost a fifth of creating and removing one (3 MB: 0.24 against 1.2 ms). A kept file is
never truncated, so a handler still mapping it (a call that timed out) reads stale bytes at worst, never past the
end of the file. Writing can fail (a full /dev/shm: Docker and Kubernetes give it 64 MiB unless told otherwise);
the call then goes inline, as it does for an archive whose handler predates this file (the manifest's
`payload_refs`).
The handler maps only regular files of its own user inside such a directory, so a request cannot make it read
anything else. This file imports only the standard library, because it ships inside the model archive.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import shutil
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "gradserve-payloads-"  # <base>/gradserve-payloads-<pid>-<random>/<n>
KEEP_IDLE_BYTES = 32 * 1024 * 1024  # payload files kept between calls, at most (a container's /dev/shm: often 64 MiB)


class PayloadRefError(ValueError):
    """A payload reference names no file this handler may map; the message says which and why."""


def load(path: str, nbytes: int) -> mmap.mmap:
    """The payload file a reference names, mapped copy-on-write (no copy of its bytes; writable, as torch wants)."""
    if not os.path.isabs(path) or os.path.realpath(path) != path or not Path(path).parent.name.startswith(PREFIX):
        raise PayloadRefError(f"payload reference {path!r} is not a file of a gradserve front door's payload "
                              "directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise PayloadRefError(f"payload file {path} cannot be opened ({e.strerror}); the front door removes it "
                              "when its call ends, so the call was probably cancelled") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise PayloadRefError(f"payload file {path} is not a regular file of this user")
        if info.st_size != nbytes or nbytes == 0:
            raise PayloadRefError(f"payload file {path} has {info.st_size} bytes, the reference says {nbytes}")
        return mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


class PayloadArea:
    """The front door's directory of payload files (see the module's docstring)."""

    def __init__(self, directory: Path, min_bytes: int) -> None:
        self.directory = directory
        self.min_bytes = min_bytes
        self._names = itertools.count()
        self._warned = False
        self._idle: OrderedDict[str, int] = OrderedDict()  # files of ended calls -> their size, oldest first

    @classmethod
    def open(cls, base: str, min_bytes: int) -> PayloadArea | None:
        """A new private directory under `base` for payloads of `min_bytes` or more; None when that is off
        (min_bytes 0, no base) or `base` cannot hold one (then every payload goes inline)."""
        if min_bytes <= 0 or not base:
            return None
        try:
            remove_orphans(Path(base))
            # The real path: the handler maps only a path that is its own real path (/dev/shm may be a link).
            directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=os.path.realpath(base)))
        except OSError as e:
            log.warning("payloads go inline through TorchServe: no payload directory in %s (%s)", base, e)
            return None
        return cls(directory, min_bytes)

    def write(self, parts: Sequence[bytes | memoryview]) -> tuple[str, int] | None:
        """The payload written to a file, an idle one of its size or a new one: its path and size; None when it
        could not be (the caller sends it inline; the first failure is logged). Hand the path back with `release`
        when the call ends."""
        size = sum(memoryview(p).nbytes for p in parts)
        path = next((p for p, n in self._idle.items() if n == size), None)
        if path is not None:
            del self._idle[path]
        else:
            path = str(self.directory / str(next(self._names)))
        written = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view:
                        n = os.write(fd, view)
                        written += n
                        view = view[n:]
            finally:
                os.close(fd)
        except OSError as e:
            self.remove(path)
            if not self._warned:
                self._warned = True
                log.warning("a payload went inline through TorchServe: writing it to %s failed (%s); a larger "
                            "/dev/shm (e.g. a memory-backed emptyDir in Kubernetes) avoids that", path, e)
            return None
        return path, written

    def release(self, path: str, nbytes: int) -> None:
        """The call that used `path` has ended: keep the file for a payload of the same size, oldest idle files
        making room, or remove it."""
        if nbytes > KEEP_IDLE_BYTES:
            self.remove(path)
            return
        self._idle[path] = nbytes
        while sum(self._idle.values()) > KEEP_IDLE_BYTES:
            self.remove(self._idle.popitem(last=False)[0])

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_orphans(base: Path) -> None:
    """Remove the payload directories under `base` that belong to this user and to a process that is gone (a
    front door killed before it could clean up)."""
    for directory in base.glob(f"{PREFIX}*"):
        pid = directory.name[len(PREFIX):].split("-", 1)[0]
        try:
            if (directory.stat().st_uid != os.getuid() or not pid.isdigit() or int(pid) == os.getpid()
                    or _alive(int(pid))):
                continue
        except OSError:
            continue
        shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True
