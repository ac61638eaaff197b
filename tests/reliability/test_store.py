"""Many models, many versions, no downtime, secure by default (the real stack): a bad archive among good ones, a
new version rolled in and the old one removed under load, a token rotated under load, oversized bodies sent
beside normal traffic, and a front door that refuses to listen beyond loopback without authentication."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from frontdoor_fixtures import GRADSERVE, TOKEN, FrontDoor, built_store, digits
from run_fixtures import make_run, selected_model

from bench.stacks import running_front_door
from client.grpc_client import decode, request
from server.generated import grpc_service_pb2_grpc as pb_grpc
from training.package import PackageConfig, package

from .conftest import archive_variant, scaled
from .load import MemorySampler, percentiles

pytestmark = pytest.mark.slow

ROWS = 4
ROTATED = ("rotated-one-4c1e", "rotated-two-9d2a")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """digits 1.0 (the suite's run) and 2.0 (another run: other answers), and the models behind them."""
    base = tmp_path_factory.mktemp("versions")
    v1 = built_store(tmp_path_factory)
    run2 = make_run(base / "runs", seed=1)
    package(run2, PackageConfig(model_store=str(base / "v2"), version="2.0"))
    return {"1.0": v1.path / "digits-1.0.mar", "2.0": base / "v2" / "digits-2.0.mar",
            "models": {"1.0": selected_model(v1.run), "2.0": selected_model(run2)}}


@pytest.fixture(scope="module")
def store_door(versions: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    """A front door on a store of digits 1.0, an archive whose weights were altered after packaging, and one
    that is not a zip at all; it watches the store every half second and takes rotated tokens from a file."""
    work = tmp_path_factory.mktemp("store-door")
    store = work / "store"
    store.mkdir()
    shutil.copy(versions["1.0"], store / "digits-1.0.mar")
    archive_variant(versions["1.0"], store, "altered", alter_weights=True)
    (store / "corrupt.mar").write_bytes(b"PK\x03\x04 this is not a model archive")
    (work / "tokens").write_text(f"{ROTATED[0]}\n")
    with running_front_door(store, work, TOKEN, "--watch", "0.5", "--token-file", str(work / "tokens")) as door:
        yield door


def labels_of(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


Answer = tuple[float, str, str, np.ndarray | None, float]  # when, status, version that answered, labels, seconds


async def clients(door: FrontDoor, x: np.ndarray, count: int, until: asyncio.Event,
                  token: Callable[[], str] = lambda: TOKEN) -> list[Answer]:
    """`count` clients sending `x` until `until` is set."""
    answers: list[Answer] = []
    async with grpc.aio.insecure_channel(door.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def client() -> None:
            while not until.is_set():
                sent = time.monotonic()
                try:
                    reply = await stub.ModelInfer(request("digits", x), timeout=10,
                                                  metadata=(("authorization", f"Bearer {token()}"),))
                    answers.append((time.monotonic(), "OK", reply.model_version, decode(reply)["label"],
                                    time.monotonic() - sent))
                except grpc.aio.AioRpcError as e:
                    answers.append((time.monotonic(), e.code().name, "", None, time.monotonic() - sent))

        await asyncio.gather(*(client() for _ in range(count)))
    return answers


def test_a_bad_archive_among_good_ones(store_door: FrontDoor, versions: dict[str, Any],
                                       record: Callable[[str, dict[str, Any]], None]) -> None:
    x = np.ascontiguousarray(digits()[0][:ROWS])
    h = store_door.headers
    for name, words in (("altered", "refusing weights that were altered"), ("corrupt", "not a gradserve archive")):
        ready = httpx.get(f"{store_door.http_url}/v2/models/{name}/ready", headers=h, timeout=10)
        assert ready.status_code == 503 and words in ready.json()["reason"], ready.text
        meta = httpx.get(f"{store_door.http_url}/v2/models/{name}", headers=h, timeout=10).json()
        assert meta["parameters"]["state"] == "failed" and words in meta["parameters"]["reason"]
        assert words in store_door.log_tail(400)
    assert httpx.get(f"{store_door.http_url}/v2/health/ready", timeout=10).status_code == 200  # the rest serves

    async def load() -> list:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(scaled(3, 20), stop.set)
        return await clients(store_door, x, 16, stop)

    answers = asyncio.run(load())
    want = labels_of(versions["models"]["1.0"], x)
    codes = Counter(code for _, code, _, _, _ in answers)
    wrong = sum(1 for _, code, _, got, _ in answers if code == "OK" and not np.array_equal(got, want))
    record("bad_archive", {"requests": len(answers), "ok": codes["OK"], "lost": len(answers) - codes["OK"] + wrong,
                           "note": "the altered archive and the corrupt one unready with their reasons "
                                   "(ModelReady 503, metadata, log); the good model served throughout"})
    assert codes == {"OK": len(answers)} and wrong == 0, codes


def test_a_new_version_rolls_in_and_the_old_one_out_under_load(store_door: FrontDoor, versions: dict[str, Any],
                                                               record: Callable[[str, dict[str, Any]], None]) -> None:
    store = store_door.workdir / "store"
    x = np.ascontiguousarray(digits()[0][:ROWS])
    want = {v: labels_of(versions["models"][v], x) for v in ("1.0", "2.0")}
    timeline: dict[str, float] = {}

    async def roll() -> list:
        stop = asyncio.Event()
        load = asyncio.create_task(clients(store_door, x, 16, stop))
        await asyncio.sleep(2)
        shutil.copy(versions["2.0"], store / ".digits-2.0.mar.partial")
        os.replace(store / ".digits-2.0.mar.partial", store / "digits-2.0.mar")  # as gradserve package writes
        timeline["written"] = time.monotonic()
        while "serving" not in timeline:  # the first answer from 2.0
            await asyncio.sleep(0.05)
            if time.monotonic() - timeline["written"] > 120:
                break
            with_v2 = httpx.get(f"{store_door.http_url}/v2/models/digits", headers=store_door.headers).json()
            if with_v2["parameters"].get("default_version") == "2.0":
                timeline["serving"] = time.monotonic()
        await asyncio.sleep(1)
        (store / "digits-1.0.mar").unlink()
        timeline["removed"] = time.monotonic()
        await asyncio.sleep(scaled(3, 10))
        stop.set()
        return await load

    answers = asyncio.run(roll())
    codes = Counter(code for _, code, _, _, _ in answers)
    by_version = Counter(version for _, code, version, _, _ in answers if code == "OK")
    wrong = [(v, got) for _, code, v, got, _ in answers if code == "OK" and not np.array_equal(got, want[v])]
    after = [v for t, code, v, _, _ in answers if code == "OK" and t > timeline.get("serving", 1e18) + 0.5]
    meta = httpx.get(f"{store_door.http_url}/v2/models/digits", headers=store_door.headers, timeout=10).json()
    record("version_roll", {"requests": len(answers), "ok": codes["OK"], "lost": len(answers) - codes["OK"],
                            "answered_by": dict(by_version),
                            "note": f"archive written to serving in {timeline['serving'] - timeline['written']:.1f} s; "
                                    f"answers by version {dict(by_version)}"})
    assert codes == {"OK": len(answers)}, codes  # 0 failed requests throughout
    assert not wrong and by_version["1.0"] > 0 and by_version["2.0"] > 0
    assert after and set(after) == {"2.0"}  # once 2.0 served, the answers were 2.0's
    assert meta["versions"] == ["2.0"] and meta["parameters"]["default_version"] == "2.0"
    assert "the default version changes from 1.0 to 2.0" in store_door.log_tail(400)


def test_a_token_rotates_under_load(store_door: FrontDoor, record: Callable[[str, dict[str, Any]], None]) -> None:
    tokens = store_door.workdir / "tokens"
    x = np.ascontiguousarray(digits()[0][:ROWS])
    current = {"token": ROTATED[0]}

    async def rotate() -> list:
        stop = asyncio.Event()
        load = asyncio.create_task(clients(store_door, x, 8, stop, token=lambda: current["token"]))
        await asyncio.sleep(1.5)
        tokens.write_text(f"{ROTATED[0]}\n{ROTATED[1]}\n")  # both valid while clients switch
        await asyncio.sleep(2.5)  # the file is read again within a second
        current["token"] = ROTATED[1]  # the clients switch
        await asyncio.sleep(1.5)
        tokens.write_text(f"{ROTATED[1]}\n")  # the old one is dropped
        await asyncio.sleep(2.5)
        stop.set()
        return await load

    answers = asyncio.run(rotate())
    codes = Counter(code for _, code, _, _, _ in answers)
    old = httpx.get(f"{store_door.http_url}/v2/models/digits",
                    headers={"authorization": f"Bearer {ROTATED[0]}"}, timeout=10)
    record("token_rotation", {"requests": len(answers), "ok": codes["OK"], "lost": len(answers) - codes["OK"],
                              "note": "clients switched from the old token to the new one while both were valid; "
                                      f"the old one is refused afterwards (HTTP {old.status_code})"})
    assert codes == {"OK": len(answers)}, codes
    assert old.status_code == 401


def oversized_body(megabytes: int = 58) -> bytes:
    """A JSON inference request of `megabytes` MiB: far more rows than any model takes."""
    values = ("0.123456," * (megabytes * 2**20 // 9)).rstrip(",")
    return ('{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [' + values + "]}]}").encode()


def test_oversized_bodies_do_not_stall_the_others(store_door: FrontDoor,
                                                  record: Callable[[str, dict[str, Any]], None]) -> None:
    body = store_door.workdir / "oversized.json"
    body.write_bytes(oversized_body())
    x = np.ascontiguousarray(digits()[0][:ROWS])

    def send_oversized(stop: threading.Event, refused: list[float]) -> None:
        """curl, a process of its own (a sender in this process would take the load generator's GIL)."""
        while not stop.is_set():
            sent = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                                   "-H", f"authorization: Bearer {TOKEN}", "--data-binary", f"@{body}",
                                   f"{store_door.http_url}/v2/models/digits/infer"],
                                  capture_output=True, text=True, timeout=120)
            code, seconds = sent.stdout.split()
            assert code == "413", sent.stdout + sent.stderr
            refused.append(float(seconds))

    async def measure(seconds: float) -> list:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await clients(store_door, x, 16, stop)

    seconds = scaled(4, 20)
    quiet = asyncio.run(measure(seconds))
    stop, refused = threading.Event(), []
    sampler = MemorySampler(store_door.process.pid)
    sampler.start()
    senders = [threading.Thread(target=send_oversized, args=(stop, refused)) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        busy = asyncio.run(measure(seconds))
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)
    memory = sampler.stop()
    lat_quiet = percentiles([a[4] for a in quiet if a[1] == "OK"])
    lat_busy = percentiles([a[4] for a in busy if a[1] == "OK"])
    door_growth = memory.get("front door", {}).get("growth_mib", 0.0)
    record("oversized_bodies", {
        "requests": len(busy) + len(refused), "ok": sum(1 for a in busy if a[1] == "OK"),
        "failed_as_expected": {"HTTP 413": len(refused)}, "lost": sum(1 for a in busy if a[1] != "OK"),
        "latency_ms": lat_busy, "quiet_latency_ms": lat_quiet, "memory": memory,
        "note": f"16 clients' p99 {lat_quiet['p99']:.0f} ms alone, {lat_busy['p99']:.0f} ms beside 4 clients sending "
                f"58 MiB bodies ({len(refused)} refused with 413 in p50 {percentiles(refused)['p50']:.0f} ms); "
                f"front door memory {door_growth:+.0f} MiB"})
    assert all(a[1] == "OK" for a in busy)
    # Refused before the body is read: 3-8 ms here. A door that read 58 MiB first would take far longer, and would
    # hold the event loop the others need for as long.
    assert refused and percentiles(refused)["p50"] < 100, percentiles(refused)
    # On 2 cores the senders' own curl processes slow everyone down (p50 22 -> 57 ms in one run), so the others'
    # p99 is held to 3x its quiet value or 250 ms above it, whichever is more (observed: 127-188 ms, 40-83 quiet).
    assert lat_busy["p99"] <= max(3 * lat_quiet["p99"], lat_quiet["p99"] + 250), (lat_quiet, lat_busy)
    assert door_growth < 150, memory


def test_no_token_no_listening_beyond_loopback(tmp_path: Path, record: Callable[[str, dict[str, Any]], None]) -> None:
    started = time.monotonic()
    refused = subprocess.run([str(GRADSERVE), "serve", "--config", os.devnull, "--host", "0.0.0.0",
                              "--model-store", str(tmp_path)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "GRADSERVE_TOKEN": ""}, cwd=tmp_path)
    seconds = time.monotonic() - started
    record("exposure_refused", {"requests": 1, "lost": 0, "failed_as_expected": {f"exit {refused.returncode}": 1},
                                "note": f"refused in {seconds:.1f} s: {refused.stderr.strip()[:90]}..."})
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0 without authentication" in refused.stderr
    assert "GRADSERVE_TOKEN" in refused.stderr and "--no-auth" in refused.stderr
    assert json.dumps(refused.stderr)  # printable
