"""Inputs and outputs in the client's shared memory: Triton's system shared memory extension, for clients on the
same host (or in the same pod).

A client creates a POSIX shared memory object (`tritonclient.utils.shared_memory`, or `shm_open`), registers it
under a name (gRPC SystemSharedMemoryRegister, REST POST /v2/systemsharedmemory/region/<name>/register with its
key, offset and byte size), writes a tensor into it and sends a request whose input carries the parameters
`shared_memory_region`, `shared_memory_byte_size` and `shared_memory_offset` instead of its bytes. A big request
then skips the transport's receive path, which is where the front door spends most of its CPU on one (about
4.3 ms per 3 MiB gRPC request).

The front door reads a region with pread into an array of its own: the request owns its bytes from then on, and a
region the client truncated or removed gives an error for that request, never a signal that would stop the
server (a mapping read past its file's end would). An output whose request names a region (the same three
parameters) is written there with pwrite once the model has answered, and comes back in the response as its
name, datatype and shape only, as Triton answers (over gRPC an empty raw_output_contents entry keeps the
others' places). The regions an output names are checked before the model runs; an output larger than the bytes
its request gave it fails the request. The server opens an object for writing where its permissions allow, and
writes only where an output asks. Keys are names in /dev/shm, as shm_open takes them; the front door's own
payload files (a folder of their own there) cannot be named.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.errors import InvalidInput, MessageTooLarge

SHM_ROOT = Path("/dev/shm")
KEY = re.compile(r"/?([A-Za-z0-9][A-Za-z0-9._-]{0,254})")
MAX_REGIONS = 1024
SETTLED_NS = 50_000_000  # a folder listed this long after its mtime holds every change of that mtime tick
# The parameters that put an input in a region (Triton's names).
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    writable: bool = False  # opened for writing too: outputs may go there

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class Target:
    """Where an output goes: `byte_size` bytes at `offset` in a region, as the request's output asked."""

    output: str
    region: str
    offset: int
    byte_size: int


class Regions:
    """The registered regions by name. Registering opens the object (for writing too, where its permissions let
    this server's user); unregistering closes it (a request using it at that moment finishes on its own
    descriptor).

    With several front-door processes (server/doors.py) a region registered through one is used through any: each
    registration is also a file in the `shared` folder they all look at, and each process opens (and closes) its
    own descriptors as the folder changes."""

    def __init__(self, root: Path = SHM_ROOT, max_read_bytes: int = 64 * 1024 * 1024,
                 shared: Path | None = None) -> None:
        self._root = Path(root)
        self._max_read_bytes = max_read_bytes  # what one input may take from a region (serve.limits.max_message_bytes)
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()  # requests read from worker threads too
        self._shared = shared
        # Regions another process registered that this one cannot open: their registration, and why.
        self._unopened: dict[str, tuple[dict[str, Any], str]] = {}
        self._listed = (-1, 0)  # the shared folder's mtime (ns) when this process last listed it, and when that was
        self._serial = itertools.count()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        with self._lock:
            self._sync()
            if name in self._regions or name in self._unopened:
                raise InvalidInput(f"shared memory region {name!r} is already registered: unregister it first")
            if len(self._regions) + len(self._unopened) >= MAX_REGIONS:
                raise InvalidInput(f"{MAX_REGIONS} shared memory regions are registered: unregister some first")
            region = self._open(name, key, offset, byte_size)
            try:
                self._publish(region)
            except BaseException:
                os.close(region.fd)
                raise
            self._regions[name] = region

    def _open(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        match = KEY.fullmatch(key)
        if match is None:
            raise InvalidInput(f"shared memory key {key!r}: a POSIX shared memory name such as /input0 (letters, "
                               "digits, '.', '_', '-'; no folders)")
        if offset < 0 or byte_size <= 0:
            raise InvalidInput(f"shared memory region {name!r}: offset must be 0 or more and byte_size more than 0, "
                               f"got offset {offset} and byte_size {byte_size}")
        path, flags = self._root / match.group(1), os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd, writable = os.open(path, os.O_RDWR | flags), True
        except OSError:  # read-only to this server's user (inputs only), or not there: the next open says which
            try:
                fd, writable = os.open(path, os.O_RDONLY | flags), False
            except OSError as e:
                raise InvalidInput(f"shared memory key {key!r} cannot be opened ({e.strerror}): create it "
                                   "(shm_open, or tritonclient.utils.shared_memory) before registering it") from None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise InvalidInput(f"shared memory key {key!r} is not a shared memory object")
            if offset + byte_size > found.st_size:
                raise InvalidInput(f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} "
                                   f"passes the end of {key!r} ({found.st_size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return Region(name, key, offset, byte_size, fd, writable)

    # --- the registrations the front-door processes share ----------------------------------------------------

    def _publish(self, region: Region) -> None:
        """The registration as a file in the shared folder; refused when another process has just registered
        the name (link, unlike rename, does not replace)."""
        if self._shared is None:
            return
        staged = self._shared / f".{os.getpid()}-{next(self._serial)}"
        staged.write_text(json.dumps(region.status()))
        try:
            os.link(staged, self._shared / _file_of(region.name))
        except FileExistsError:
            raise InvalidInput(f"shared memory region {region.name!r} is already registered: unregister it first"
                               ) from None
        finally:
            staged.unlink()

    def _withdraw(self, name: str) -> None:
        if self._shared is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._shared / _file_of(name)).unlink()
        self._unopened.pop(name, None)
        region = self._regions.pop(name, None)
        if region is not None:
            os.close(region.fd)

    def _sync(self) -> None:
        """Open what the other processes registered, close what they unregistered (the lock held). The folder is
        listed again when its mtime moved, and while a change could still hide in the same mtime tick."""
        if self._shared is None:
            return
        mtime, now = os.stat(self._shared).st_mtime_ns, time.time_ns()
        if mtime == self._listed[0] and self._listed[1] - mtime > SETTLED_NS:
            return
        self._listed = (mtime, now)
        wanted: dict[str, dict[str, Any]] = {}
        for entry in os.scandir(self._shared):
            if not entry.name.startswith("."):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    record = json.loads(Path(entry.path).read_text())
                    wanted[record["name"]] = record
        for name, region in list(self._regions.items()):
            if wanted.get(name) != region.status():
                os.close(self._regions.pop(name).fd)
        self._unopened = {}
        for name, record in wanted.items():
            if name not in self._regions:
                try:
                    self._regions[name] = self._open(name, record["key"], record["offset"], record["byte_size"])
                except InvalidInput as e:
                    self._unopened[name] = (record, str(e))

    def unregister(self, name: str = "") -> None:
        """The region `name`, or every region when name is empty; an unknown name is an error."""
        with self._lock:
            self._sync()
            for named in self._named(name):
                self._withdraw(named)

    def status(self, name: str = "") -> list[dict[str, Any]]:
        with self._lock:
            self._sync()
            return [self._regions[r].status() if r in self._regions else self._unopened[r][0]
                    for r in self._named(name)]

    def _named(self, name: str) -> list[str]:
        """The region `name`, or every region when name is empty (the lock held)."""
        known = [*self._regions, *self._unopened]
        if not name:
            return known
        if name not in known:
            raise InvalidInput(f"no shared memory region {name!r} is registered")
        return [name]

    def read(self, input_name: str, parameters: Mapping[str, Any]) -> memoryview:
        """The bytes an input's parameters name: a copy the request owns."""
        region, fd, size, offset = self._locate("input", input_name, parameters)
        try:
            data = np.empty(size, np.uint8)
            got = os.preadv(fd, [data], region.offset + offset) if size else 0
        finally:
            os.close(fd)
        if got != size:
            raise InvalidInput(f"input {input_name!r}: region {region.name!r} holds {got} of the {size} bytes asked "
                               "for (its object shrank after it was registered)")
        return memoryview(data)

    def target(self, output_name: str, parameters: Mapping[str, Any]) -> Target:
        """Where an output's parameters ask it to be written, checked before the model runs."""
        region, fd, size, offset = self._locate("output", output_name, parameters)
        os.close(fd)
        if not region.writable:
            raise InvalidInput(f"output {output_name!r}: region {region.name!r} is read-only to the server: create "
                               "its object writable by the server's user to receive outputs there")
        return Target(output_name, region.name, offset, size)

    def write(self, target: Target, data: bytes | memoryview) -> None:
        """An output's bytes into the region its request named, from the region's start plus its offset."""
        n = memoryview(data).nbytes
        if n > target.byte_size:
            raise InvalidInput(f"output {target.output!r} has {n} bytes, more than the {target.byte_size} its request "
                               f"gave it in region {target.region!r}: give it at least {n} ({BYTE_SIZE})")
        where = {REGION: target.region, BYTE_SIZE: target.byte_size, OFFSET: target.offset}
        region, fd, _, offset = self._locate("output", target.output, where)
        try:
            at = region.offset + offset
            if os.fstat(fd).st_size < at + n:
                raise InvalidInput(f"output {target.output!r}: region {region.name!r} is smaller than when it was "
                                   "registered (its object shrank); register it again")
            view = memoryview(data).cast("B")
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
        finally:
            os.close(fd)

    def _locate(self, kind: str, tensor: str, parameters: Mapping[str, Any]) -> tuple[Region, int, int, int]:
        """The region a tensor's parameters name, a descriptor of it the caller closes, and the byte size and offset
        in it, checked against the region's bounds."""
        name, size, offset = (parameters.get(k) for k in (REGION, BYTE_SIZE, OFFSET))
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) \
                or not isinstance(offset if offset is not None else 0, int):
            raise InvalidInput(f"{kind} {tensor!r}: {REGION} needs {BYTE_SIZE} (and optionally {OFFSET}) "
                               "as integers")
        offset = offset or 0
        if kind == "input" and size > self._max_read_bytes:
            raise MessageTooLarge(f"input {tensor!r}: {size} bytes from shared memory, more than the "
                                  f"{self._max_read_bytes} a request may carry; send fewer rows per request")
        with self._lock:
            self._sync()
            region = self._regions.get(name)
            if name in self._unopened:
                raise InvalidInput(f"{kind} {tensor!r}: region {name!r} cannot be used here: "
                                   f"{self._unopened[name][1]}")
            if region is None:
                raise InvalidInput(f"{kind} {tensor!r}: no shared memory region {name!r} is registered: "
                                   "register it first")
            fd = os.dup(region.fd)  # unregistering under this call closes the region's descriptor, not this one
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            os.close(fd)
            raise InvalidInput(f"{kind} {tensor!r}: {OFFSET} {offset} + {BYTE_SIZE} {size} passes the end "
                               f"of region {name!r} ({region.byte_size} bytes)")
        return region, fd, size, offset

    def close(self) -> None:
        """This process lets go of its descriptors; the registrations stay for the other processes."""
        with self._lock:
            for region in self._regions.values():
                os.close(region.fd)
            self._regions.clear()


def _file_of(name: str) -> str:
    """A region's file in the shared folder: any name a client gives, as a file name."""
    return name.encode().hex()[:200] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def wants_region(parameters: Mapping[str, Any]) -> bool:
    return REGION in parameters
