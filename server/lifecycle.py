"""The models the front door serves, over time: every version of every model in the store, each loaded into
TorchServe (and warmed up: its handler ran a forward) before it takes traffic, drained and unloaded when its
archive goes, swapped without a gap when its archive is replaced.

A version is `loading`, `ready`, `failed` (its archive cannot be read or its worker cannot load it: the reason
is kept and reported) or `draining` (its archive is gone: no new requests; it is unloaded once the ones in
flight finished). A model's default version, what requests that name no version get, is the highest ready
version unless `serve.default_versions` pins one; every change of a default is logged with its reason.

The store is read again every `serve.watch_s` seconds and on SIGHUP (`reload`). After TorchServe restarts,
every version is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from handlers.manifest import Manifest
from server.errors import ModelNotFound, Unavailable
from server.models import Archive, scan, version_key
from server.torchserve.client import LoadFailed, TorchServeClient
from server.torchserve.process import TorchServe

log = logging.getLogger("gradserve.models")

SETTLE_S = 0.5  # a file changed more recently than this may still be being written: read it at the next scan


@dataclass
class Version:
    """One archive of a model, as loaded (or not) into TorchServe."""

    archive: Archive
    state: str = "loading"  # loading | ready | failed | draining
    reason: str = ""  # why it failed
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def manifest(self) -> Manifest:
        assert self.archive.manifest is not None
        return self.archive.manifest

    @property
    def internal(self) -> str:
        return self.archive.internal_name


class ModelManager:
    def __init__(self, store: Path, client: TorchServeClient, default_versions: Mapping[str, str] | None = None,
                 load_timeout_s: float = 180.0, concurrency: int = 4) -> None:
        self._store = Path(store)
        self._client = client
        self._pinned = dict(default_versions or {})
        self._load_timeout_s = load_timeout_s
        self._loads = asyncio.Semaphore(concurrency)
        self._versions: dict[str, dict[str, Version]] = {}  # name -> version -> Version (what requests route to)
        self._defaults: dict[str, str] = {}
        self._files: dict[Path, tuple[float, int, Archive]] = {}
        self._scanned = False
        self._starting = True  # loading every version after a (re)start: not serving until that is done
        self._failed_builds: set[str] = set()  # sha256 of new builds of a version that failed to load
        self._torchserve: TorchServe | None = None
        self._lock = asyncio.Lock()  # one reconciliation at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[], None]] = []
        # Other front-door processes (server/doors.py): a retired build is unloaded once `elsewhere(internal)`
        # says none of them has a request at it either.
        self.elsewhere: Callable[[str], Awaitable[None]] | None = None
        client.add_listener(self._changed)

    @classmethod
    def loaded(cls, archives: list[Archive], client: TorchServeClient) -> ModelManager:
        """A manager whose archives TorchServe already serves (tests with a fake TorchServe)."""
        manager = cls(Path("."), client)
        for archive in archives:
            manager._versions.setdefault(archive.name, {})[archive.version] = Version(archive, state="ready")
        manager._choose_defaults("")
        return manager

    # --- what the data plane asks ----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """`listener()` runs whenever a version's readiness or a default changes."""
        self._listeners.append(listener)

    @property
    def names(self) -> list[str]:
        return sorted(self._versions)

    def knows(self, name: str) -> bool:
        return name in self._versions

    def versions(self, name: str) -> dict[str, Version]:
        if name not in self._versions:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.names}")
        return self._versions[name]

    def resolve(self, name: str, version: str = "") -> Version:
        """The version a request names, or the model's default."""
        versions = self.versions(name)
        chosen = version or self._defaults.get(name, "")
        if chosen not in versions or (version and versions[chosen].state == "draining"):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {self._listed(name)}")
        return versions[chosen]

    def ready(self, loaded: Version) -> bool:
        return loaded.state == "ready" and self._client.ready(loaded.internal)

    def route(self, name: str, version: str = "") -> Version:
        """The version to send a request to: ready, or Unavailable saying why not."""
        loaded = self.resolve(name, version)
        if self.ready(loaded):
            return loaded
        if loaded.state == "failed":
            raise Unavailable(f"model {name!r} version {loaded.archive.version!r} cannot be served: {loaded.reason}")
        raise Unavailable(f"model {name!r} is not ready (it is {loaded.state}, or TorchServe is restarting); "
                          "retry shortly")

    def serving(self) -> bool:
        """At least one model's default version is ready and, after a (re)start, every version has loaded (or
        failed: a model whose every version failed is reported by its own ModelReady, and does not hold the
        others back). Later, a version loading beside the served ones leaves the server serving: a new archive
        in a store that every replica shares must not turn them all unready at once."""
        ready = any(self._default_ready(n) for n in self._versions)
        loading = self._starting and any(v.state == "loading" for vs in self._versions.values() for v in vs.values())
        return ready and not loading

    def _default_ready(self, name: str) -> bool:
        version = self._versions[name].get(self._defaults.get(name, ""))
        return version is not None and self.ready(version)

    def _listed(self, name: str) -> list[str]:
        return sorted((v for v, loaded in self._versions[name].items() if loaded.state != "draining"), key=version_key)

    def live_builds(self) -> set[str]:
        """The TorchServe names of the builds in the table that are not draining."""
        return {v.internal for versions in self._versions.values() for v in versions.values() if v.state != "draining"}

    def default(self, name: str) -> str:
        return self._defaults.get(name, "")

    @contextlib.contextmanager
    def in_flight(self, loaded: Version) -> Iterator[None]:
        """A request at `loaded`: a draining version is unloaded only once none is."""
        loaded.in_flight += 1
        loaded.idle.clear()
        try:
            yield
        finally:
            loaded.in_flight -= 1
            if not loaded.in_flight:
                loaded.idle.set()

    # --- following the store and TorchServe --------------------------------------------------------------------

    async def torchserve_started(self, torchserve: TorchServe) -> None:
        """TorchServe (re)started: load every version again, then follow the store."""
        self._torchserve = torchserve
        self._starting = True
        async with self._lock:
            again = [loaded for vs in self._versions.values() for loaded in vs.values()
                     if loaded.archive.manifest is not None and loaded.state != "draining"]
            for loaded in again:
                loaded.state, loaded.reason = "loading", ""
            self._changed()
            await asyncio.gather(*(self._load(loaded) for loaded in again))
        await self.reload()
        self._starting = False
        self._changed()

    def torchserve_stopped(self) -> None:
        self._torchserve = None
        self._changed()

    async def watch(self, every_s: float) -> None:
        """Read the store again every `every_s` seconds, for as long as it runs."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a bad scan must not end the watch
                log.exception("reading the model store %s failed", self._store)

    async def reload(self) -> None:
        """Bring what is served in line with the store: load new archives (and new builds of a version) beside
        what serves now, switch traffic once they are ready, drain and unload what the store no longer holds."""
        async with self._lock:
            # At start the store is taken as it is; later, a file that just changed may still be being written.
            # In a thread: scan reads and hashes every changed archive.
            found, self._files = await asyncio.to_thread(scan, self._store, self._files,
                                                         SETTLE_S if self._scanned else 0.0)
            self._scanned = True
            current = {(n, v): loaded for n, vs in self._versions.items() for v, loaded in vs.items()}
            new = [Version(a) for key, a in found.items() if key not in current]
            rebuilt = [(Version(a), current[key]) for key, a in found.items() if key in current
                       and current[key].archive.sha256 != a.sha256 and a.sha256 not in self._failed_builds]
            removed = [loaded for key, loaded in current.items() if key not in found]
            for loaded in new:
                self._versions.setdefault(loaded.archive.name, {})[loaded.archive.version] = loaded
            if new:
                self._choose_defaults("a version appeared")
            await asyncio.gather(*(self._load(loaded) for loaded in new),
                                 *(self._load(loaded, old) for loaded, old in rebuilt))
            for loaded in removed:
                self._retire(loaded, "its archive was removed from the store")
            self._choose_defaults("a version finished loading")

    async def _load(self, loaded: Version, old: Version | None = None) -> None:
        """Load a version into TorchServe; a new build of a version loads beside the old one, which keeps the
        traffic until the new one is ready, then drains."""
        archive = loaded.archive
        if archive.manifest is None:
            loaded.state, loaded.reason = "failed", archive.problem
            log.error("model %s: %s", archive.name, archive.problem)
            self._install(loaded, old)
            return
        torchserve = self._torchserve
        if torchserve is None:
            return  # TorchServe is down: torchserve_started loads everything again
        started = time.monotonic()
        async with self._loads:
            try:
                await self._client.register(torchserve, archive.path.name, archive.internal_name, archive.workers,
                                            self._load_timeout_s)
            except (LoadFailed, httpx.HTTPError, OSError) as e:  # TorchServe may also die under the load
                loaded.state, loaded.reason = "failed", str(e)
                log.error("model %s version %s failed to load: %s", archive.name, archive.version, e)
                self._install(loaded, old, keep_old=True)
                return
        loaded.state = "ready"
        log.info("model %s version %s loaded from %s in %.1f s", archive.name, archive.version, archive.path.name,
                 time.monotonic() - started)
        self._install(loaded, old)

    def _install(self, loaded: Version, old: Version | None, keep_old: bool = False) -> None:
        """`loaded` takes the place of `old` (a replaced build), which drains; a failed replacement leaves the
        old build serving."""
        name, version = loaded.archive.name, loaded.archive.version
        if old is not None and keep_old:
            self._failed_builds.add(loaded.archive.sha256)  # not tried again until the file changes again
            return
        self._versions.setdefault(name, {})[version] = loaded
        if old is not None:
            self._retire(old, "a new build of the same version replaced it")
        self._changed()

    def _retire(self, loaded: Version, why: str) -> None:
        """No new requests; unloaded once the ones in flight finished."""
        name, version = loaded.archive.name, loaded.archive.version
        if self._versions.get(name, {}).get(version) is loaded:
            loaded.state = "draining"
            log.info("model %s version %s: %s; draining", name, version, why)
        self._choose_defaults(f"version {version} went away")
        task = asyncio.get_running_loop().create_task(self._unload(loaded))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, loaded: Version) -> None:
        await loaded.idle.wait()
        if self.elsewhere is not None:
            await self.elsewhere(loaded.internal)
        name, version = loaded.archive.name, loaded.archive.version
        if loaded.archive.manifest is not None:
            await self._client.unregister(loaded.internal)
        versions = self._versions.get(name, {})
        if versions.get(version) is loaded:
            del versions[version]
            if not versions:
                del self._versions[name]
                self._defaults.pop(name, None)
        log.info("model %s version %s unloaded", name, version)
        self._changed()

    def _choose_defaults(self, why: str) -> None:
        for name, versions in self._versions.items():
            candidates = sorted((v for v, loaded in versions.items() if loaded.state != "draining"), key=version_key)
            ready = [v for v in candidates if self.ready(versions[v])]
            pinned = self._pinned.get(name)
            if pinned in versions and versions[pinned].state != "draining":
                choice, reason = pinned, "pinned by serve.default_versions"
            elif ready:
                choice, reason = ready[-1], "the highest ready version" + (f" ({why})" if why else "")
                if pinned:
                    reason += f"; the pinned version {pinned} is not in the store"
            elif candidates:
                choice, reason = candidates[-1], "the highest version (none is ready yet)"
            else:
                continue
            if self._defaults.get(name) != choice:
                before = self._defaults.get(name)
                self._defaults[name] = choice
                if before is None:
                    log.info("model %s: default version %s (%s)", name, choice, reason)
                else:
                    log.warning("model %s: the default version changes from %s to %s: %s", name, before, choice,
                                reason)
        self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # --- the same table in another front-door process (server/doors.py) ---------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What another front-door process needs to route requests as this one does (JSON)."""
        return {"starting": self._starting, "defaults": dict(self._defaults), "versions": [
            {"path": str(v.archive.path), "sha256": v.archive.sha256, "problem": v.archive.problem,
             "workers": v.archive.workers, "state": v.state, "reason": v.reason,
             "manifest": v.archive.manifest.to_dict() if v.archive.manifest is not None else None}
            for versions in self._versions.values() for v in versions.values()]}

    def mirror(self, snapshot: Mapping[str, Any]) -> list[Version]:
        """Route as the process that sent `snapshot` does (this manager then neither reads the store nor loads
        anything). The builds that left its table, or drain: the sender unloads each once this process has no
        request at it either."""
        before = {v.internal: v for versions in self._versions.values() for v in versions.values()}
        table: dict[str, dict[str, Version]] = {}
        for entry in snapshot["versions"]:
            manifest = entry["manifest"] and Manifest.from_dict(entry["manifest"])
            archive = Archive(Path(entry["path"]), entry["sha256"], manifest, entry["problem"], entry["workers"])
            loaded = before.pop(archive.internal_name, None) or Version(archive)
            loaded.state, loaded.reason = entry["state"], entry["reason"]
            table.setdefault(archive.name, {})[archive.version] = loaded
        self._versions, self._defaults = table, dict(snapshot["defaults"])
        self._starting = snapshot["starting"]
        self._changed()
        return [*before.values(), *(v for vs in table.values() for v in vs.values() if v.state == "draining")]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
