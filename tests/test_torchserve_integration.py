"""A real TorchServe (Java) on free loopback ports, token auth on, model API off, serving digits.mar."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import re
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from run_fixtures import digits
from torchserve_fixtures import packaged_store, predictions_stub, running_torchserve

from handlers import codec
from handlers.factory import ModelSpec
from handlers.handler import QUIET_METRICS_ENV
from server.backend import Backend
from server.config import ServeConfig, TorchServeSection
from server.generated import torchserve_pb2
from server.lifecycle import ModelManager
from server.models import read_archive
from server.torchserve import process
from server.torchserve.client import Keys, TorchServeClient, wait_until_ready
from server.torchserve.process import TorchServe, TorchServeConfig, TorchServeError, archive_model_name, check_java

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packaged_store(tmp_path_factory)


@pytest.fixture(scope="module")
def torchserve(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with running_torchserve(store, tmp_path_factory.mktemp("torchserve")) as ts:
        yield ts


def reference_model(store: Path) -> torch.nn.Module:
    """The model rebuilt from the archive's manifest and weights, in eval mode, outside TorchServe."""
    with zipfile.ZipFile(store / "digits.mar") as z:
        manifest = json.loads(z.read("gradserve.json"))
        state = torch.load(io.BytesIO(z.read("weights.pt")), weights_only=True)
    model = ModelSpec.from_dict(manifest["model_config"]).build()
    model.load_state_dict(state)
    return model.eval()


def copy_archive(archive: Path, store: Path, member: str, edit: Callable[[bytes], bytes]) -> Path:
    """A copy of `archive` in a new store folder, one of its files changed by `edit`; returns the store."""
    store.mkdir()
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(store / archive.name, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, edit(data) if item.filename == member else data)
    return store


def test_everything_listens_on_loopback_only(torchserve: TorchServe) -> None:
    tree = psutil.Process(torchserve.pid)
    listening = [c.laddr for p in [tree, *tree.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(_loopback(addr.ip) for addr in listening), listening
    assert torchserve.config.grpc_inference_port in {addr.port for addr in listening}
    written = dict(line.split("=", 1) for line in (torchserve.config.workdir / "config.properties").read_text().split())
    assert written["enable_model_api"] == "false" and written["disable_token_authorization"] == "false"
    assert written["install_py_dep_per_model"] == "false"


def test_its_workers_are_told_that_their_metric_lines_are_dropped(torchserve: TorchServe) -> None:
    """Our log configuration drops the metric line a worker prints per call, so the handler is told not to print it
    (handlers/handler.py): both sides spell the variable alike, and the running workers have it."""
    assert process.QUIET_METRICS_ENV == QUIET_METRICS_ENV and torchserve.config.log_config == process.LOG_CONFIG
    workers = [p for p in psutil.Process(torchserve.pid).children(recursive=True)
               if "model_service_worker" in " ".join(p.cmdline())]
    assert workers and all(p.environ().get(QUIET_METRICS_ENV) == "1" for p in workers)


def test_the_jvm_does_not_start_a_thread_for_every_call(torchserve: TorchServe) -> None:
    """TorchServe hands each call to its worker as a task on the common ForkJoinPool; where that pool's parallelism
    is 1 (2 cores) Java runs every task on a new thread. Our JVM options keep the pool (process.jvm_options)."""
    (java,) = [p for p in psutil.Process(torchserve.pid).children(recursive=True) if p.name() == "java"]
    stub, metadata = predictions_stub(torchserve)
    payload = codec.encode({"input": digits()[0][:1]})
    started = _jvm_counter(java.pid, "java.threads.started")
    for _ in range(100):
        stub.Predictions(torchserve_pb2.PredictionsRequest(model_name="digits", input={"data": payload}),
                         metadata=metadata, timeout=30)
    assert _jvm_counter(java.pid, "java.threads.started") - started < 20


def _jvm_counter(pid: int, name: str) -> int:
    """A counter of a running HotSpot JVM from its perf data file (what `jcmd PID PerfCounter.print` reads)."""
    data = Path(tempfile.gettempdir(), f"hsperfdata_{psutil.Process(pid).username()}", str(pid)).read_bytes()
    order = "<" if data[4] == 1 else ">"
    entry, count = struct.unpack_from(f"{order}ii", data, 24)
    for _ in range(count):
        length, name_at, _, kind, _, _, _, data_at = struct.unpack_from(f"{order}iiicBBBi", data, entry)
        if data[entry + name_at:data.index(b"\0", entry + name_at)].decode() == name and kind == b"J":
            return int(struct.unpack_from(f"{order}q", data, entry + data_at)[0])
        entry += length
    raise KeyError(name)


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    with pytest.raises(TorchServeError, match="openjdk-17-jre-headless"):
        check_java()


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return getattr(address, "ipv4_mapped", None) == ipaddress.ip_address("127.0.0.1") or str(address) == "127.0.0.1"


def test_200_concurrent_predictions_are_batched_and_correct(torchserve: TorchServe, store: Path) -> None:
    stub, metadata = predictions_stub(torchserve)
    rng = np.random.default_rng(0)
    images = digits()[0]
    bad = {13: b"garbage", 57: codec.encode({"input": images[:2].astype(np.float64)}),
           101: codec.encode({"input": images[:3, :, :4]}), 177: codec.encode({"input": np.full((2, 1, 8, 8), np.inf,
                                                                                               np.float32)})}
    inputs = {i: images[rng.choice(len(images), int(rng.integers(1, 33)))] for i in range(200) if i not in bad}
    payloads = {**{i: codec.encode({"input": x}) for i, x in inputs.items()}, **bad}
    futures = {i: stub.Predictions.future(torchserve_pb2.PredictionsRequest(model_name="digits",
                                                                             input={"data": payloads[i]}),
                                          metadata=metadata, timeout=60) for i in range(200)}
    replies = {i: codec.decode(f.result().prediction) for i, f in futures.items()}

    model = reference_model(store)
    for i, x in inputs.items():
        assert replies[i].error is None, replies[i].error
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(replies[i].tensors["logits"], logits, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(replies[i].tensors["label"], logits.argmax(1))
    for i in bad:
        assert replies[i].error is not None and replies[i].error.code == codec.INVALID_ARGUMENT
        assert replies[i].error.message
    assert "bad magic" in replies[13].error.message
    assert "FP64" in replies[57].error.message and "[n, 1, 8, 8]" in replies[101].error.message

    log = torchserve.model_log_path.read_text()
    sizes = [int(n) for n in re.findall(r"gradserve batch: first call with (\d+) requests", log)]
    assert max(sizes) > 1 and len(sizes) == len(set(sizes)), f"TorchServe never batched: {sizes}"
    # The worker ran the model code shipped in the archive, not the repository's.
    assert re.search(r"model code .*/models/.*/training/model\.py", log)


def test_requests_without_the_token_are_refused(torchserve: TorchServe) -> None:
    stub, _ = predictions_stub(torchserve)
    request = torchserve_pb2.PredictionsRequest(model_name="digits", input={"data": b""})
    for metadata in ([], [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predictions(request, metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{torchserve.endpoint.inference_url}/predictions/digits", data=b"x", timeout=10)
    assert http.value.code == 400 and b"Token Authorization failed" in http.value.read()  # TorchServe's choice


async def renew(torchserve: TorchServe) -> Keys:
    """TorchServe's keys renewed by a client of its own (as the front door's would), read back."""
    client = TorchServeClient()
    try:
        await client.start(torchserve, 60)
        await client.renew_keys()
        assert client.keys is not None
        return client.keys
    finally:
        await client.stop()


def test_renewed_keys_replace_the_old_ones(torchserve: TorchServe) -> None:
    stub, old_metadata = predictions_stub(torchserve)
    old = Keys.read(torchserve.endpoint.key_file)
    assert old.expires > time.time()
    new = asyncio.run(renew(torchserve))
    assert new.inference != old.inference and new.expires >= old.expires
    payload = codec.encode({"input": digits()[0][:1]})
    request = torchserve_pb2.PredictionsRequest(model_name="digits", input={"data": payload})
    with pytest.raises(grpc.RpcError):
        stub.Predictions(request, metadata=old_metadata, timeout=10)
    reply = stub.Predictions(request, metadata=[("authorization", f"Bearer {new.inference}")], timeout=10)
    assert codec.decode(reply.prediction).error is None


def test_model_api_is_off(torchserve: TorchServe, store: Path) -> None:
    keys = Keys.read(torchserve.endpoint.key_file)
    register = urllib.request.Request(f"{torchserve.endpoint.management_url}/models?url=digits-1.0.mar"
                                      "&model_name=other",
                                      method="POST", headers={"Authorization": f"Bearer {keys.management}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(register, timeout=10)
    assert refused.value.code in (403, 405)
    assert archive_model_name(store / "digits.mar") == "digits"


def test_rest_body_carries_the_same_bytes(torchserve: TorchServe, store: Path) -> None:
    x = digits()[0][:4]
    key = Keys.read(torchserve.endpoint.key_file).inference
    request = urllib.request.Request(f"{torchserve.endpoint.inference_url}/predictions/digits",
                                     data=codec.encode({"input": x}), method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = codec.decode(response.read())
    with torch.no_grad():
        expected = reference_model(store)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(reply.tensors["logits"], expected, atol=1e-5, rtol=0)


def test_the_backend_follows_keys_renewed_behind_its_back(store: Path, tmp_path: Path) -> None:
    """TorchServe drops a key the moment it issues the next one, before it has rewritten its key file: the
    front door's backend, holding the old keys, must stay ready and keep answering (a readiness poll refused
    once made a whole replica unready for a poll interval, and thousands of requests UNAVAILABLE). TorchServe
    runs as the front door runs it: no model at start, the archive loaded through its model API."""
    archive = read_archive(store / "digits.mar")
    x = digits()[0][:3]
    torchserve = TorchServe(TorchServeConfig(model_store=store, workdir=tmp_path / "ts", enable_model_api=True))

    async def scenario() -> list[bool]:
        client = TorchServeClient(TorchServeSection(ready_poll_s=3600))
        backend = Backend(ServeConfig(), ModelManager.loaded([archive], client), client)
        await asyncio.to_thread(torchserve.start)
        await client.start(torchserve, 60)
        await client.register(torchserve, "digits.mar", archive.internal_name, timeout=60)
        readiness = [backend.ready()]
        try:
            for _ in range(3):
                await renew(torchserve)  # what the backend's own renewal races with
                await client.poll_ready()
                readiness.append(backend.ready())
                _, outputs = await backend.infer("digits", "", {"input": x}, timeout=10)
                assert outputs["logits"].shape == (3, 10)
        finally:
            await client.stop()
        return readiness

    try:
        assert asyncio.run(scenario()) == [True] * 4
    finally:
        torchserve.stop()


def test_a_model_that_cannot_load_fails_the_start_fast_with_the_workers_words(store: Path, tmp_path: Path) -> None:
    """A broken archive (here: weights altered after packaging, so the handler refuses them) never comes up:
    the launcher says so after a few failed loads, quoting the worker, instead of waiting out its timeout."""
    broken = copy_archive(store / "digits.mar", tmp_path / "store", "weights.pt",
                          lambda data: data[:-200] + bytes([data[-200] ^ 1]) + data[-199:])
    torchserve = TorchServe(TorchServeConfig(model_store=broken, workdir=tmp_path / "ts", models=("digits.mar",)))
    started = time.monotonic()
    try:
        torchserve.start()
        with pytest.raises(TorchServeError, match="failed to load 3 times") as failed:
            asyncio.run(wait_until_ready(torchserve, 120))
    finally:
        torchserve.stop()
    assert time.monotonic() - started < 60
    assert "refusing weights that were altered" in str(failed.value)


@pytest.mark.parametrize("asked", [2, "per core"])
def test_the_front_door_runs_the_workers_the_archive_asks_for(store: Path, tmp_path: Path, asked: int | str) -> None:
    """`package.min_workers` is how a machine with more cores gets more TorchServe workers: the model manager
    loads each archive with its model-config.yaml's minWorkers (here 2), not a fixed one; an archive packaged with
    0 (no minWorkers) runs one worker per core of the machine that serves it."""
    workers = asked if isinstance(asked, int) else len(os.sched_getaffinity(0))
    edit = (rb"\1Workers: 2\n" if asked == 2 else b"")
    wide = copy_archive(store / "digits.mar", tmp_path / "store", "model-config.yaml",
                        lambda data: re.sub(rb"(?m)^(min|max)Workers: \d+\n", edit, data))
    archive = read_archive(wide / "digits.mar")
    assert archive.workers == workers
    torchserve = TorchServe(TorchServeConfig(model_store=wide, workdir=tmp_path / "ts", enable_model_api=True))

    async def scenario() -> list[dict]:
        client = TorchServeClient(TorchServeSection(ready_poll_s=3600))
        models = ModelManager(wide, client)
        await asyncio.to_thread(torchserve.start)
        await client.start(torchserve, 60)
        try:
            await models.torchserve_started(torchserve)
            assert models.ready(models.resolve("digits"))
        finally:
            await client.stop()
            await models.close()
        keys = Keys.read(torchserve.endpoint.key_file)
        described = urllib.request.Request(f"{torchserve.endpoint.management_url}/models/{archive.internal_name}",
                                           headers={"Authorization": f"Bearer {keys.management}"})
        with urllib.request.urlopen(described, timeout=10) as answer:
            return json.loads(answer.read())

    try:
        (model,) = asyncio.run(scenario())
    finally:
        torchserve.stop()
    assert len(model["workers"]) == workers and model["minWorkers"] == workers, model
