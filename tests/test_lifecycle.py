"""The model manager's rules on a fake TorchServe: every version in the store served, the default the highest
ready version (or the pinned one) and never changed silently, new builds loaded before they take traffic,
removed ones drained, a bad archive unready with its reason while the others serve."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import zipfile
from pathlib import Path

import pytest

from server.errors import ModelNotFound, Unavailable
from server.lifecycle import ModelManager
from server.models import scan, version_key
from server.torchserve.client import LoadFailed

MANIFEST = {"format_version": 2, "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "prediction", "datatype": "FP32", "shape": [-1, 1]}],
            "weights": {"file": "weights.pt", "sha256": "0" * 64}, "task": "regression"}


def mar(store: Path, name: str, version: str, build: str = "a", file: str | None = None,
        broken: bool = False, workers: int | None = None) -> Path:
    """An archive as TorchServe and gradserve read it (its manifest, TorchServe's own, and its model-config.yaml
    when `workers` is given)."""
    path = store / (file or f"{name}-{version}.mar")
    model = {"modelName": name, "modelVersion": version}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gradserve.json", json.dumps({**MANIFEST, "name": name, "version": version, "build": build,
                                                 "broken": broken}))
        if workers is not None:
            z.writestr("model-config.yaml", f"minWorkers: {workers}\nmaxWorkers: {workers}\n")
            model["configFile"] = "model-config.yaml"
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": model}))
    return path


class FakeTorchServe:
    """Loads take `load_s`; an archive whose manifest says broken fails to load, as a handler that raises."""

    def __init__(self, load_s: float = 0.05) -> None:
        self.load_s = load_s
        self.loaded: dict[str, str] = {}  # internal name -> archive file
        self.history: list[tuple[str, str]] = []
        self.workers: dict[str, int] = {}  # internal name -> workers it was loaded with
        self._listeners: list = []

    def add_listener(self, listener) -> None:  # type: ignore[no-untyped-def]
        self._listeners.append(listener)

    def ready(self, internal: str) -> bool:
        return internal in self.loaded

    async def register(self, torchserve, archive: str, internal: str, workers: int = 1,  # type: ignore[no-untyped-def]
                       timeout: float | None = None) -> None:
        await asyncio.sleep(self.load_s)
        self.history.append(("load", internal))
        self.workers[internal] = workers
        if json.loads(zipfile.ZipFile(self.store / archive).read("gradserve.json"))["broken"]:
            raise LoadFailed("model x: its worker failed to load 3 times: RuntimeError: refusing weights")
        self.loaded[internal] = archive
        for listener in self._listeners:
            listener()

    async def unregister(self, internal: str) -> None:
        self.history.append(("unload", internal))
        self.loaded.pop(internal, None)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path / "store"


def manager(store: Path, pinned: dict[str, str] | None = None) -> tuple[ModelManager, FakeTorchServe]:
    fake = FakeTorchServe()
    fake.store = store  # type: ignore[attr-defined]
    return ModelManager(store, fake, pinned), fake  # type: ignore[arg-type]


async def started(models: ModelManager) -> None:
    await models.torchserve_started(object())  # type: ignore[arg-type]


def test_versions_are_ordered_as_people_mean() -> None:
    assert sorted(["1.10", "1.9", "2.0", "1.0"], key=version_key) == ["1.0", "1.9", "1.10", "2.0"]


def test_every_version_is_served_and_the_default_is_the_highest(store: Path) -> None:
    mar(store, "m", "1.0")
    mar(store, "m", "2.0")
    mar(store, "m", "2.0", file="m.mar")  # gradserve package's copy of the latest build: the same archive
    found, _ = scan(store)
    assert sorted(found) == [("m", "1.0"), ("m", "2.0")] and found["m", "2.0"].path.name == "m-2.0.mar"

    async def main() -> None:
        models, fake = manager(store)
        await started(models)
        assert models.default("m") == "2.0" and models.route("m").archive.version == "2.0"
        assert models.route("m", "1.0").archive.version == "1.0" and len(fake.loaded) == 2
        with pytest.raises(ModelNotFound, match=r"has no version '3.0'; it has \['1.0', '2.0'\]"):
            models.resolve("m", "3.0")
        assert models.serving()

    asyncio.run(main())


def test_a_pinned_default_stays(store: Path) -> None:
    mar(store, "m", "1.0")
    mar(store, "m", "2.0")

    async def main() -> None:
        models, _ = manager(store, {"m": "1.0"})
        await started(models)
        mar(store, "m", "3.0")
        await asyncio.sleep(0.6)  # past the time a file is left to settle
        await models.reload()
        assert models.default("m") == "1.0" and models.route("m", "3.0").archive.version == "3.0"

    asyncio.run(main())


def test_a_new_version_takes_traffic_once_loaded_and_a_removed_one_drains(store: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    old = mar(store, "m", "1.0")

    async def main() -> None:
        models, fake = manager(store)
        await started(models)
        fake.load_s = 0.3
        mar(store, "m", "2.0")
        await asyncio.sleep(0.6)
        loading = asyncio.create_task(models.reload())
        await asyncio.sleep(0.1)
        assert models.route("m").archive.version == "1.0"  # 2.0 is loading: the default has not moved
        assert models.serving()  # and the server stays ready: a replica is not pulled while it loads 2.0
        await loading
        assert models.route("m").archive.version == "2.0"
        one = models.route("m", "1.0")
        with models.in_flight(one):  # a request still at 1.0 while its archive goes
            old.unlink()
            await models.reload()
            assert one.state == "draining" and one.internal in fake.loaded
            with pytest.raises(ModelNotFound):
                models.route("m", "1.0")  # no new requests for it
        await asyncio.sleep(0.05)
        assert one.internal not in fake.loaded and ("unload", one.internal) in fake.history

    with caplog.at_level(logging.INFO, logger="gradserve.models"):
        asyncio.run(main())
    assert "the default version changes from 1.0 to 2.0: the highest ready version" in caplog.text


def test_a_new_build_of_a_version_swaps_without_a_gap(store: Path) -> None:
    mar(store, "m", "1.0", build="a")

    async def main() -> None:
        models, fake = manager(store)
        await started(models)
        first = models.route("m")
        fake.load_s = 0.3
        mar(store, "m", "1.0", build="b")  # the same version, rebuilt
        await asyncio.sleep(0.6)
        swap = asyncio.create_task(models.reload())
        await asyncio.sleep(0.1)
        assert models.route("m") is first  # still served by the old build while the new one loads
        await swap
        second = models.route("m")
        assert second is not first and second.internal != first.internal and second.internal in fake.loaded
        await asyncio.sleep(0.05)
        assert first.internal not in fake.loaded

    asyncio.run(main())


def test_a_bad_archive_is_unready_with_its_reason_and_the_others_serve(store: Path) -> None:
    mar(store, "good", "1.0")
    mar(store, "broken", "1.0", broken=True)
    (store / "corrupt.mar").write_bytes(b"not a zip at all")

    async def main() -> None:
        models, fake = manager(store)
        await started(models)
        assert models.route("good").archive.version == "1.0" and models.serving()
        with pytest.raises(Unavailable, match="refusing weights"):
            models.route("broken")
        with pytest.raises(Unavailable, match="corrupt.mar is not a gradserve archive"):
            models.route("corrupt")
        assert models.versions("broken")["1.0"].state == "failed"
        # TorchServe restarts: everything that can load is loaded again
        fake.loaded.clear()
        await started(models)
        assert models.route("good") and len(fake.loaded) == 1

    asyncio.run(main())


def test_a_failed_rebuild_leaves_the_old_build_serving_and_is_not_retried_until_it_changes(store: Path) -> None:
    mar(store, "m", "1.0", build="a")

    async def main() -> None:
        models, fake = manager(store)
        await started(models)
        first = models.route("m")
        mar(store, "m", "1.0", build="b", broken=True)
        await asyncio.sleep(0.6)
        for _ in range(3):  # the watch reads the store every few seconds
            await models.reload()
        loads = [internal for what, internal in fake.history if what == "load"]
        assert models.route("m") is first and len(loads) == 2, loads  # a, then b once
        mar(store, "m", "1.0", build="c")  # fixed
        await asyncio.sleep(0.6)
        await models.reload()
        assert models.route("m") is not first and models.route("m").internal in fake.loaded

    asyncio.run(main())


def test_not_serving_until_every_version_loaded_at_start(store: Path) -> None:
    mar(store, "a", "1.0")
    mar(store, "b", "1.0")

    async def main() -> None:
        fake = FakeTorchServe(load_s=0.3)
        fake.store = store  # type: ignore[attr-defined]
        models = ModelManager(store, fake, concurrency=1)  # type: ignore[arg-type]  # one load at a time
        await models.reload()  # the store as it is, before TorchServe runs
        start = asyncio.create_task(started(models))
        await asyncio.sleep(0.45)
        assert models.route("a") and not models.serving()  # a serves, b still loads: not ready yet
        await start
        assert models.serving()

    asyncio.run(main())


def test_each_archive_loads_with_the_workers_its_config_asks_for(store: Path) -> None:
    mar(store, "wide", "1", workers=3)
    mar(store, "plain", "1")  # no model-config.yaml (or one without minWorkers): one worker per core, as TorchServe

    async def scenario() -> dict[str, int]:
        models, fake = manager(store)
        await started(models)
        return {name: fake.workers[models.resolve(name).internal] for name in ("wide", "plain")}

    assert asyncio.run(scenario()) == {"wide": 3, "plain": len(os.sched_getaffinity(0))}


class FakeFollowerClient:
    """The TorchServe client of a further front-door process: readiness is what the first process says."""

    def __init__(self) -> None:
        self.states: dict[str, bool] = {}
        self._listeners: list = []

    def add_listener(self, listener) -> None:  # type: ignore[no-untyped-def]
        self._listeners.append(listener)

    def ready(self, internal: str) -> bool:
        return self.states.get(internal, False)


def test_another_process_routes_by_the_table_it_is_sent_and_holds_a_retired_build_until_its_requests_end(
        store: Path) -> None:
    """server/doors.py: the first process's table, through JSON, routes another process's requests alike; a
    build retired there is unloaded only once the other process has no request at it either."""
    old = mar(store, "m", "1.0")
    mar(store, "m", "2.0")

    async def main() -> None:
        models, fake = manager(store)
        follower_client = FakeFollowerClient()
        follower = ModelManager(store / "unused", follower_client)  # type: ignore[arg-type]
        released = asyncio.Event()

        async def elsewhere(internal: str) -> None:
            await released.wait()
        models.elsewhere = elsewhere

        def send() -> list:  # what Doors sends: the table, and TorchServe's readiness
            follower_client.states = {i: fake.ready(i) for i in fake.loaded}
            return follower.mirror(json.loads(json.dumps(models.snapshot())))

        assert send() == [] and not follower.serving()  # nothing loaded yet: not serving
        await started(models)
        send()
        assert follower.serving() and follower.route("m").archive.version == "2.0"
        one = follower.route("m", "1.0")
        assert one.manifest == models.route("m", "1.0").manifest
        with follower.in_flight(one):  # a request in the other process at 1.0 while its archive goes
            old.unlink()
            await models.reload()
            retired = send()
            assert [v.internal for v in retired] == [one.internal] and one.state == "draining"
            with pytest.raises(ModelNotFound):
                follower.route("m", "1.0")
            await asyncio.sleep(0.05)
            assert one.internal in fake.loaded  # its own requests ended, but not the other process's
        released.set()  # the other process reports it idle (server/doors.py `_report_idle`)
        await asyncio.sleep(0.05)
        assert one.internal not in fake.loaded
        send()
        assert follower.versions("m").keys() == {"2.0"}

    asyncio.run(main())
