"""Unit tests of the front door's parts against an in-process fake of TorchServe (the real stack is tested in
test_frontdoor_e2e.py): the error table, TorchServe's client, the coalescer, the gRPC servicer and the REST app
on free ports."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import json
import logging
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from common import ROOT
from fastapi import FastAPI
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.grpc_client import Client, decode, request
from gradserve.config import ConfigError, build
from handlers import codec, sharedmem
from handlers.manifest import Manifest
from handlers.sharedmem import PayloadArea
from server import errors, grpc_env, grpc_servicer
from server import main as server_main
from server import metrics as server_metrics
from server.auth import Tokens
from server.backend import Backend
from server.coalescer import Coalescer
from server.config import Coalesce, Limits, Listen, ServeConfig
from server.errors import InvalidInput
from server.frontdoor import check_port_free
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc
from server.grpc_server import create_server
from server.lifecycle import ModelManager
from server.models import Archive
from server.rest import create_app
from server.torchserve import client as torchserve_client
from server.torchserve.client import TorchServeClient, backend_error
from server.torchserve.process import Endpoint, TorchServe

MANIFEST = {
    "name": "digits", "version": "1.0", "platform": "pytorch_torchserve", "max_rows": 16, "labels": list("0123456789"),
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                {"name": "label", "datatype": "INT64", "shape": [-1]}],
    "selection": {"step": 300, "rule_satisfied": True, "record": {"step": 300, "grad_norm": 0.5}},
    "weights": {"file": "weights.pt", "sha256": "ab" * 32},
}
# An image model: rows come as pixels or as encoded files (one BYTES element per row); it names each row's class.
FILES_MANIFEST = {
    **MANIFEST, "name": "files",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
               {"name": "image", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "class_name", "datatype": "BYTES", "shape": [-1]}],
}


def fake_logits(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(len(rows), -1)[:, :10] * 2 + 1  # (N, 10), a function of each row alone


def objects(*elements: bytes) -> np.ndarray:
    """A BYTES tensor: a 1-D object array of bytes (np.array would make a fixed-width bytes array)."""
    x = np.empty(len(elements), dtype=object)
    x[:] = elements
    return x


def fake_files_outputs(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image model's answer: for a file, its length and b"got:" + the file; for pixels, the label."""
    if "image" in tensors:
        images = tensors["image"]
        return {"label": np.array([len(v) for v in images], np.int64),
                "class_name": objects(*(b"got:" + v for v in images))}
    label = fake_logits(tensors["input"]).argmax(1).astype(np.int64)
    return {"label": label, "class_name": objects(*(b"digit %d" % v for v in label))}


class FakeTorchServe:
    """TorchServe's client replaced by a function of the rows (and knobs to misbehave); the real Backend
    receives it through its constructor."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail, self.calls = delay, fail, []
        self.payloads: list[str] = []  # per call: inline or shared_memory
        self.outputs: list[tuple[str, ...] | None] = []  # per call: the outputs the request asked the handler for
        self._ready = True
        self._listeners: list = []

    def ready(self, model: str) -> bool:
        return self._ready

    def set_ready(self, ready: bool) -> None:  # e.g. TorchServe went away
        self._ready = ready
        for listener in self._listeners:
            listener()

    def add_listener(self, listener) -> None:  # type: ignore[no-untyped-def]
        self._listeners.append(listener)

    async def predict(self, model: str, payload: bytes, deadline: float) -> bytes:
        message = codec.decode(payload)
        self.payloads.append("inline" if message.ref is None else "shared_memory")
        if message.ref is not None:  # what the handler does with a payload in shared memory
            message = codec.decode(sharedmem.load(message.ref.path, message.ref.nbytes))
        tensors = message.tensors
        ((_, rows),) = tensors.items()
        self.calls.append(len(rows))
        self.outputs.append(message.outputs)
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if model.startswith("files--"):  # TorchServe's name of the build: <name>--<version>--<sha>
            return codec.encode(fake_files_outputs(tensors))
        if (rows == -1).any():  # a poisoned row the door let through: the handler refuses the whole call
            return codec.encode_error(codec.INVALID_ARGUMENT, "row with -1")
        logits = fake_logits(rows)
        return codec.encode({"logits": logits, "label": logits.argmax(1).astype(np.int64)})


DIGITS = Archive(Path("digits-1.0.mar"), "ab" * 32, Manifest.from_dict(MANIFEST))


def fake_backend(config: ServeConfig, **fake: object) -> tuple[Backend, FakeTorchServe]:
    """The digits model and the image model behind the real Backend, on a fake TorchServe."""
    torchserve = FakeTorchServe(**fake)  # type: ignore[arg-type]
    files = Archive(Path("files-1.0.mar"), "cd" * 32, Manifest.from_dict(FILES_MANIFEST))
    return Backend(config, ModelManager.loaded([DIGITS, files], torchserve), torchserve), torchserve


# --- the error table ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "grpc_code", "http"), [
    (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND, 404),
    (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (errors.Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.MessageTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
])
def test_error_table(error: Exception, grpc_code: grpc.StatusCode, http: int) -> None:
    status, message = errors.status_of(error)
    assert (status.grpc, status.http, message) == (grpc_code, http, "x")


def test_unknown_errors_are_internal_generic_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        status, message = errors.status_of(KeyError("secret detail"))
    assert (status.grpc, status.http) == (grpc.StatusCode.INTERNAL, 500)
    assert "secret" not in message and "secret detail" in caplog.text


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_the_front_door_runs_on_the_event_loop_its_config_names(name: str) -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert server_main.run(ServeConfig(event_loop=name), loop_module()).split(".")[0] == name


def test_grpc_settings_are_named_unless_yours_are_and_naming_them_loads_no_grpc() -> None:
    """gRPC reads GRPC_EXPERIMENTS when it loads, so server/grpc_env.py must not load it (gradserve/cli.py applies it
    first); tests/test_doors.py checks what the settings do in a running front door."""
    environ: dict[str, str] = {}
    grpc_env.apply(environ)
    assert environ == {"GRPC_EXPERIMENTS": grpc_env.EXPERIMENTS}
    mine = {"GRPC_EXPERIMENTS": ""}  # empty: gRPC's own defaults
    grpc_env.apply(mine)
    assert mine == {"GRPC_EXPERIMENTS": ""}
    code = "import sys, server.grpc_env; assert 'grpc' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_an_unknown_event_loop_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="event_loop must be one of .*uvloop.*asyncio.*'tokio'"):
        build(ServeConfig, {"event_loop": "tokio"})


@pytest.mark.parametrize(("gpus", "line"), [(None, None), (0, "number_of_gpu=0"), (2, "number_of_gpu=2")])
def test_torchserve_gets_the_gpus_the_config_gives_it(gpus: int | None, line: str | None, tmp_path: Path) -> None:
    config = build(ServeConfig, {"model_store": str(tmp_path), "torchserve": {"gpus": gpus}})
    properties = TorchServe(server_main.torchserve_config(config)).properties().splitlines()
    assert [p for p in properties if p.startswith("number_of_gpu")] == ([line] if line else [])


def test_torchserve_gets_our_jvm_options_then_the_configs(tmp_path: Path) -> None:
    config = build(ServeConfig, {"model_store": str(tmp_path), "torchserve": {"jvm_options": ["-Xmx2g"]}})
    properties = dict(line.split("=", 1) for line in
                      TorchServe(server_main.torchserve_config(config)).properties().splitlines())
    ours, theirs = properties["vmargs"].rsplit(" ", 1)
    parallelism = int(ours.removeprefix("-Djava.util.concurrent.ForkJoinPool.common.parallelism="))
    assert parallelism >= 2 and theirs == "-Xmx2g"


@pytest.mark.parametrize("options", [["-Xmx2g -Xms1g"], ["Xmx2g"], [2]])
def test_jvm_options_that_java_would_misread_are_refused(options: list[object]) -> None:
    with pytest.raises(ConfigError, match=r"one per item, each starting with - and without spaces"):
        build(ServeConfig, {"torchserve": {"jvm_options": options}})


def test_a_negative_gpu_count_is_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError, match=r"torchserve.gpus must be 0 or more \(0: CPU only\)"):
        build(ServeConfig, {"torchserve": {"gpus": -1}})


@pytest.mark.parametrize(("status", "text", "expected"), [
    (408, "", errors.DeadlineExceeded),
    (503, "Model \"digits\" has no worker to serve inference request.", errors.Unavailable),  # or queue full
    (404, "Model not found: digits", errors.Unavailable),  # unregistered under the call
    (507, "Worker died.", errors.Unavailable),  # exit 137 already seen
    (500, "Worker died.", errors.Unavailable),  # exit code not yet seen
    (500, "NullPointerException", RuntimeError),  # a bug somewhere: INTERNAL, logged
])
def test_torchserve_failures_map_to_what_a_caller_can_act_on(status: int, text: str,
                                                              expected: type[Exception]) -> None:
    assert type(backend_error(status, text)) is expected


async def fake_management_api(ready: bool = True) -> tuple[asyncio.Server, str]:
    """TorchServe's management API as far as readiness goes: every model has a READY worker."""
    body = json.dumps([{"workers": [{"status": "READY" if ready else "UNLOADING"}]}]).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def write_key_file(path: Path) -> Path:
    expiry = {"expiration time": "2099-01-01T00:00:00.000000000Z"}
    path.write_text(json.dumps({"inference": {"key": "i", **expiry}, "management": {"key": "m", **expiry},
                                "API": {"key": "a"}}))
    return path


class FakeInferenceApi:
    """TorchServe's HTTP inference API: `await answer(request)` (head and body) gives the raw response, or None
    to close the connection without one. Keeps the requests seen and each connection's count of requests."""

    def __init__(self, answer) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.seen: list[bytes] = []
        self.connections: list[int] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def drop_connections(self) -> None:
        """Close every connection from the server's side, as TorchServe does when it restarts."""
        for writer in self.writers:
            writer.close()

    def close(self) -> None:
        self.drop_connections()
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(0)
        self.writers.append(writer)
        mine = len(self.connections) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.seen.append(head + await reader.readexactly(length))
                self.connections[mine] += 1
                response = await self.answer(self.seen[-1])
                if response is None:
                    break
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        writer.close()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


async def connected_client(inference_url: str, key_file: Path, management_url: str = "http://127.0.0.1:9"
                           ) -> TorchServeClient:
    client = TorchServeClient()
    await client.connect(Endpoint("127.0.0.1:9", management_url, inference_url, key_file), [DIGITS.internal_name])
    assert await client._read_keys_once() is not None
    return client


def test_predictions_travel_over_kept_alive_connections_with_the_inference_key(tmp_path: Path) -> None:
    async def echo(request: bytes) -> bytes:
        return ok(request.partition(b"\r\n\r\n")[2][::-1])

    async def main() -> None:
        api = FakeInferenceApi(echo)
        client = await connected_client(await api.start(), write_key_file(tmp_path / "keys.json"))
        deadline = asyncio.get_running_loop().time() + 5
        try:
            for i in range(5):
                assert await client.predict("digits_1.0", b"payload %d" % i, deadline) == (b"payload %d" % i)[::-1]
            assert api.connections == [5]  # one connection, kept alive
            assert api.seen[0].startswith(b"POST /predictions/digits_1.0 HTTP/1.1\r\n")
            assert b"\r\nauthorization: Bearer i\r\n" in api.seen[0]
            assert b"\r\ncontent-type: application/octet-stream\r\n" in api.seen[0]
            answers = await asyncio.gather(*(client.predict("m", b"%d" % i, deadline) for i in range(8)))
            assert answers == [(b"%d" % i)[::-1] for i in range(8)]
            assert len(api.connections) == 8 and sum(api.connections) == 13  # as many as calls in flight at once
        finally:
            await client.stop()
            api.close()

    asyncio.run(main())


def test_predictions_follow_renewed_keys_and_connections_the_server_closed(tmp_path: Path) -> None:
    """A 400 "Token Authorization failed" (TorchServe renewed its keys under the call) is retried with the key
    file's new key; a kept-alive connection the server closed while it was idle is replaced without an error."""
    keys = write_key_file(tmp_path / "keys.json")
    stale = (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 42\r\n\r\n"
             b'{"message": "Token Authorization failed."}')

    async def answer(request: bytes) -> bytes | None:
        if b"Bearer i\r\n" in request:  # TorchServe renews its keys, then refuses the old one
            keys.write_text(keys.read_text().replace('"key": "i"', '"key": "i2"'))
            return stale
        return ok(b"yes") if b"Bearer i2\r\n" in request else ok(b"wrong key")

    async def main() -> None:
        api = FakeInferenceApi(answer)
        client = await connected_client(await api.start(), keys)
        deadline = asyncio.get_running_loop().time() + 5
        try:
            assert await client.predict("m", b"x", deadline) == b"yes"
            assert [b"Bearer i2\r\n" in r for r in api.seen] == [False, True]
            api.drop_connections()  # the kept-alive connection, idle now
            await asyncio.sleep(0.1)
            assert await client.predict("m", b"x", deadline) == b"yes"
            assert len(api.seen) == 3 and len(api.connections) == 2
            api.drop_connections()
            await asyncio.sleep(0.1)
            api.answer = lambda request: asyncio.sleep(0)  # now closes every connection without an answer
            with pytest.raises(errors.Unavailable):  # the dead connection, then a new one, which fails too
                await client.predict("m", b"x", deadline)
            assert len(api.seen) == 4  # not tried a third time
        finally:
            await client.stop()
            api.close()

    asyncio.run(main())


def test_a_prediction_past_its_deadline_is_deadline_exceeded_and_its_connection_dropped(tmp_path: Path) -> None:
    async def slow(request: bytes) -> bytes:
        await asyncio.sleep(1)
        return ok(b"late")

    async def main() -> None:
        api = FakeInferenceApi(slow)
        client = await connected_client(await api.start(), write_key_file(tmp_path / "keys.json"))
        try:
            with pytest.raises(errors.DeadlineExceeded):
                await client.predict("m", b"x", asyncio.get_running_loop().time() + 0.2)
            assert client._inference._idle == []  # type: ignore[union-attr]  # its answer would come late on it
            assert await client.predict("m", b"x", asyncio.get_running_loop().time() + 5) == b"late"
            assert len(api.connections) == 2
        finally:
            await client.stop()
            api.close()

    asyncio.run(main())


def test_torchserve_dying_under_calls_answers_them_unavailable(tmp_path: Path) -> None:
    """TorchServe dies with calls in flight: the supervisor's `stop` closes the connections under them. Each caller
    must get an answer (UNAVAILABLE, at once), not a call that its client sees only as a deadline passing."""
    async def hang(request: bytes) -> bytes:
        await asyncio.sleep(30)
        return ok(b"")

    async def main() -> None:
        api = FakeInferenceApi(hang)
        management, management_url = await fake_management_api()
        client = await connected_client(await api.start(), write_key_file(tmp_path / "keys.json"), management_url)
        config = ServeConfig(coalesce=Coalesce(max_rows=64, max_calls=1))
        backend = Backend(config, ModelManager.loaded([DIGITS], client), client)
        await client.poll_ready()
        assert backend.ready()
        try:
            x = np.zeros((1, 1, 8, 8), np.float32)
            calls = [asyncio.create_task(backend.infer("digits", "", {"input": x}, timeout=20)) for _ in range(5)]
            await asyncio.sleep(0.5)  # one call at TorchServe, four queued behind it
            started = time.monotonic()
            await client.stop()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            assert time.monotonic() - started < 2
            assert all(isinstance(r, errors.Unavailable) for r in results), results
            assert not backend.ready()
        finally:
            api.close()
            management.close()

    asyncio.run(main())


def test_readiness_polls_share_one_kept_alive_connection_and_a_silent_api_counts_as_unanswered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchserve_client, "POLL_TIMEOUT_S", 0.3)
    connections, answers = [], ["READY", "READY", "READY", "UNLOADING", None, None, None, None]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = f"GET /models/{DIGITS.internal_name} ".encode()
            assert head.startswith(path) and b"authorization: Bearer m" in head, head
            status = answers.pop(0)
            if status is None:  # TorchServe busy: no answer
                await asyncio.sleep(30)
            body = json.dumps([{"workers": [{"status": status}]}]).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = await connected_client("http://127.0.0.1:9", write_key_file(tmp_path / "keys.json"), url)
        try:
            seen = []
            for _ in range(3):
                await client.poll_ready()
                seen.append(client.ready(DIGITS.internal_name))
            assert seen == [True] * 3 and len(connections) == 1  # one connection, kept alive
            await client.poll_ready()
            assert not client.ready(DIGITS.internal_name)  # no READY worker
            answers[:0] = ["READY"]
            await client.poll_ready()
            seen = []
            for _ in range(client.settings.unknown_polls_max):  # unanswered polls keep the last state, then not
                started = time.monotonic()
                await client.poll_ready()
                assert time.monotonic() - started < 2
                seen.append(client.ready(DIGITS.internal_name))
            assert seen == [True] * (client.settings.unknown_polls_max - 1) + [False]
        finally:
            await client.stop()
            server.close()

    asyncio.run(main())


# --- the coalescer --------------------------------------------------------------------------------------------

def test_large_calls_go_through_shared_memory_to_handlers_that_read_it_and_leave_no_file(tmp_path: Path) -> None:
    area = PayloadArea.open(str(tmp_path), 1024)  # 16 digits rows are 4 KiB: by file; one row (256 bytes) inline
    assert area is not None
    torchserve = FakeTorchServe()
    reads = Archive(Path("digits-1.0.mar"), "ab" * 32, Manifest.from_dict({**MANIFEST, "payload_refs": True}))
    older = Archive(Path("older-1.0.mar"), "cd" * 32, Manifest.from_dict({**MANIFEST, "name": "older"}))
    backend = Backend(ServeConfig(coalesce=Coalesce(max_rows=0)), ModelManager.loaded([reads, older], torchserve),
                      torchserve, payloads=area)
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)

    def calls(via: str) -> float:
        return server_metrics.REGISTRY.get_sample_value("gradserve_backend_calls_total", {"payload": via}) or 0.0

    async def main() -> None:
        before = calls("shared_memory"), calls("inline")
        for name, rows in (("digits", x), ("digits", x[:1]), ("older", x)):
            _, out = await backend.infer(name, "", {"input": rows})
            np.testing.assert_array_equal(out["logits"], fake_logits(rows))
            # the one file is kept when its call returns, for the next payload of its size; none other is made
            assert len(list(area.directory.iterdir())) == 1
        assert torchserve.payloads == ["shared_memory", "inline", "inline"]  # an older handler: inline
        assert (calls("shared_memory") - before[0], calls("inline") - before[1]) == (1, 2)

    asyncio.run(main())
    backend.close()
    assert not area.directory.exists()


def test_coalescer_groups_concurrent_rows_and_gives_each_caller_its_own() -> None:
    calls: list[int] = []

    async def call(rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        await asyncio.sleep(0.01)
        return {"y": rows * 10}

    async def main() -> None:
        coalescer = Coalescer(call, max_rows=8, max_delay_s=0.005, max_calls=1)
        xs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(30)]
        outs = await asyncio.gather(*(coalescer.submit(x, 1e9) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out["y"], x * 10)
        assert len(calls) < len(xs) and max(calls) <= 8 and sum(calls) == sum(len(x) for x in xs)

    asyncio.run(main())


def test_a_group_asks_for_the_outputs_any_member_wants() -> None:
    asked: list[frozenset[str]] = []

    async def call(rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        asked.append(outputs)
        await asyncio.sleep(0.01)
        return {"a": rows, "b": rows + 1}

    async def group(*wants: frozenset[str]) -> frozenset[str]:
        asked.clear()
        coalescer = Coalescer(call, max_rows=64, max_delay_s=0.005, max_calls=1)
        blocker = asyncio.create_task(coalescer.submit(np.zeros((1, 2)), 1e9, frozenset({"z"})))  # holds the call
        await asyncio.sleep(0.001)
        await asyncio.gather(blocker, *(coalescer.submit(np.zeros((1, 2)), 1e9, w) for w in wants))
        assert len(asked) == 2  # the blocker's call, then one for the group
        return asked[1]

    assert asyncio.run(group(frozenset({"a"}), frozenset({"b"}), frozenset({"a"}))) == {"a", "b"}
    assert asyncio.run(group(frozenset({"a"}), frozenset())) == frozenset()  # a member wants all of them


def test_the_handler_is_asked_for_the_requested_outputs_only() -> None:
    async def main() -> FakeTorchServe:
        backend, torchserve = fake_backend(ServeConfig())
        x = np.full((1, 1, 8, 8), 0.5, np.float32)
        _, outputs = await backend.infer("digits", "", {"input": x}, ["label"])
        assert list(outputs) == ["label"]
        await backend.infer("digits", "", {"input": x})
        return torchserve

    torchserve = asyncio.run(main())
    assert torchserve.outputs[0] == ("label",)
    assert set(torchserve.outputs[1] or ()) == set(Manifest.from_dict(MANIFEST).output_names())


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def call(rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        return {"y": rows}

    async def main() -> float:
        coalescer = Coalescer(call, max_rows=64, max_delay_s=0.5, max_calls=2)
        start = time.perf_counter()
        await coalescer.submit(np.zeros((1, 2)), 1e9)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.1  # far below the 0.5 s delay bound



def test_a_cancelled_group_call_answers_its_members_unavailable() -> None:
    async def call(rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        await asyncio.sleep(30)
        return {"y": rows}

    async def main() -> list[BaseException]:
        coalescer = Coalescer(call, max_rows=64, max_delay_s=0.001, max_calls=1)
        alone = asyncio.create_task(coalescer.submit(np.zeros((1, 2)), 1e9))  # in its own task
        await asyncio.sleep(0.01)
        members = [asyncio.create_task(coalescer.submit(np.zeros((1, 2)), 1e9)) for _ in range(3)]
        await asyncio.sleep(0.05)  # queued behind it, then sent as one group after max_delay_s
        assert len(coalescer._tasks) == 1
        for task in list(coalescer._tasks):  # e.g. the loop shutting down
            task.cancel()
        alone.cancel()
        return await asyncio.wait_for(asyncio.gather(*members, return_exceptions=True), 2)

    assert all(isinstance(r, errors.Unavailable) for r in asyncio.run(main()))


def test_a_lone_request_is_sent_from_its_own_task_and_cancelling_it_frees_the_slot() -> None:
    calls: list[int] = []

    async def call(rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        await asyncio.sleep(30 if len(calls) == 1 else 0)
        return {"y": rows + 1}

    async def main() -> None:
        coalescer = Coalescer(call, max_rows=64, max_delay_s=10, max_calls=1)
        first = asyncio.create_task(coalescer.submit(np.zeros((2, 2)), 1e9))
        await asyncio.sleep(0.01)
        assert calls == [2] and not coalescer._tasks  # no task of the coalescer's: the caller's own
        first.cancel()  # its caller gave up (the client went away): the call ends, the slot is free at once
        with pytest.raises(asyncio.CancelledError):
            await first
        started = time.monotonic()
        answer = await coalescer.submit(np.ones((1, 2)), 1e9)
        assert time.monotonic() - started < 1  # not queued behind the cancelled call for max_delay_s
        np.testing.assert_array_equal(answer["y"], np.full((1, 2), 2.0))
        assert calls == [2, 1]

    asyncio.run(main())

def test_a_bad_member_fails_alone() -> None:
    async def main() -> None:
        backend, _ = fake_backend(ServeConfig(coalesce=Coalesce(max_rows=64, max_calls=1)), delay=0.01)
        xs = [np.full((1, 1, 8, 8), 0.5, np.float32) for _ in range(6)]
        xs[3] = np.full((1, 1, 8, 8), -1, np.float32)
        results = await asyncio.gather(*(backend.infer("digits", "", {"input": x}) for x in xs),
                                       return_exceptions=True)
        assert isinstance(results[3], InvalidInput)
        for i, result in enumerate(results):
            if i != 3:
                assert not isinstance(result, Exception)
                np.testing.assert_array_equal(result[1]["logits"], fake_logits(xs[i]))

    asyncio.run(main())


# --- gRPC and REST against the fake ----------------------------------------------------------------------------

def run_with_server(config: ServeConfig, body, **fake: object) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        backend, torchserve = fake_backend(config, **fake)
        server, port = create_server(config, backend, Tokens(config.auth))
        await server.start()
        try:
            await body(torchserve, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    asyncio.run(main())


CONFIG = build(ServeConfig, {"listen": {"grpc_port": 0}, "auth": {"token": "t0k"},
                             "limits": {"max_message_bytes": 64 * 1024}}, env={})


async def code_of(coroutine) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await coroutine
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_grpc_infer_errors_and_stream() -> None:
    async def body(torchserve: FakeTorchServe, target: str) -> None:
        x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
        async with Client(target, token="t0k") as client:
            out = await client.infer("digits", x, ["label"])
            assert list(out) == ["label"] and (out["label"] == fake_logits(x).argmax(1)).all()
            assert await code_of(client.infer("nope", x)) == grpc.StatusCode.NOT_FOUND
            assert await code_of(client.infer("digits", x[:, :, :, :7].copy())) == grpc.StatusCode.INVALID_ARGUMENT
            assert await code_of(client.infer("digits", np.zeros((17, 1, 8, 8), np.float32))) \
                == grpc.StatusCode.INVALID_ARGUMENT
            big = np.zeros((300, 1, 8, 8), np.float32)  # 76 KB > 64 KiB
            assert await code_of(client.infer("digits", big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with Client(target) as anonymous:
            assert await code_of(anonymous.infer("digits", x)) == grpc.StatusCode.UNAUTHENTICATED
            assert await anonymous.ready()  # health needs no token
        async with grpc.aio.insecure_channel(target) as channel:  # every method but health needs the token
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            wrong = (("authorization", "Bearer nope"),)
            for call in (stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=wrong),
                         stub.ModelMetadata(pb.ModelMetadataRequest(name="digits")),
                         stub.ModelReady(pb.ModelReadyRequest(name="digits"), metadata=wrong)):
                assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            stream = stub.ModelStreamInfer(iter([request("digits", x)]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [a async for a in stream]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [a async for a in listing]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            requests = [request("digits", x, request_id="1"), request("digits", x[:, :, :2], request_id="2"),
                        request("digits", x, request_id="3")]
            answers = [a async for a in stub.ModelStreamInfer(iter(requests), metadata=(("authorization",
                                                                                           "Bearer t0k"),))]
            assert [a.infer_response.id for a in answers] == ["1", "2", "3"]
            assert [bool(a.error_message) for a in answers] == [False, True, False]
            np.testing.assert_array_equal(decode(answers[2].infer_response)["logits"], fake_logits(x))

    run_with_server(CONFIG, body)


@pytest.mark.parametrize(("fake", "code"), [
    ({"delay": 1.0}, grpc.StatusCode.DEADLINE_EXCEEDED),
    ({"fail": RuntimeError("boom")}, grpc.StatusCode.INTERNAL),
])
def test_grpc_backend_failures(fake: dict, code: grpc.StatusCode) -> None:
    async def body(torchserve: FakeTorchServe, target: str) -> None:
        async with Client(target, token="t0k") as client:
            x = np.zeros((1, 1, 8, 8), np.float32)
            assert await code_of(client.infer("digits", x, timeout=0.2)) == code

    run_with_server(CONFIG, body, **fake)


def test_not_ready_is_unavailable_and_overload_is_refused() -> None:
    async def body(torchserve: FakeTorchServe, target: str) -> None:
        x = np.zeros((1, 1, 8, 8), np.float32)
        async with Client(target, token="t0k") as client:
            codes = await asyncio.gather(*(code_of(client.infer("digits", x)) for _ in range(6)))
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            torchserve.set_ready(False)  # TorchServe went away
            assert await code_of(client.infer("digits", x)) == grpc.StatusCode.UNAVAILABLE
            assert not await client.ready()

    config = ServeConfig(listen=Listen(grpc_port=0), auth=CONFIG.auth, limits=Limits(max_in_flight=2),
                         coalesce=Coalesce(max_rows=0))
    run_with_server(config, body, delay=0.2)


def test_typed_contents_equal_raw() -> None:
    async def body(torchserve: FakeTorchServe, target: str) -> None:
        x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
        typed = pb.ModelInferRequest(model_name="digits", id="t")
        typed.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel())
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answer = await stub.ModelInfer(typed, metadata=(("authorization", "Bearer t0k"),))
            assert answer.id == "t"
            np.testing.assert_allclose(decode(answer)["logits"], fake_logits(x))
            short = pb.ModelInferRequest(model_name="digits")
            short.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend([1.0])
            assert await code_of(stub.ModelInfer(short, metadata=(("authorization", "Bearer t0k"),))) \
                == grpc.StatusCode.INVALID_ARGUMENT

    run_with_server(CONFIG, body)


@pytest.mark.parametrize("datatype, count", [("FP32", 1), ("FP32", 31), ("FP32", 5000), ("FP64", 3000),
                                             ("FP32", 786_432)])
def test_typed_float_contents_are_read_from_their_wire_bytes(datatype: str, count: int) -> None:
    """The same array as element by element, whatever the byte length's varint size; NaN, infinities, -0.0 and
    subnormals kept bit for bit."""
    dtype = np.float32 if datatype == "FP32" else np.float64
    x = np.random.default_rng(count).normal(size=count).astype(dtype)
    x[: min(count, 4)] = [np.nan, -np.inf, -0.0, np.finfo(dtype).smallest_subnormal][: min(count, 4)]
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[count])
    field = grpc_servicer.CONTENTS_FIELD[datatype]
    getattr(tensor.contents, field).extend(x)
    got = grpc_servicer._wire_floats(tensor.contents, field, datatype)
    assert got is not None and got.dtype == dtype
    assert got.tobytes() == x.tobytes()
    assert grpc_servicer.decode_input(tensor, None).tobytes() == x.tobytes()


def test_typed_float_contents_with_other_fields_or_none_are_read_element_by_element() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2])
    assert grpc_servicer._wire_floats(tensor.contents, "fp32_contents", "FP32") is None  # nothing set
    tensor.contents.fp32_contents.extend([1.5, 2.5])
    tensor.contents.int_contents.extend([7])  # a client's mistake: the FP32 field is what counts, as before
    assert grpc_servicer._wire_floats(tensor.contents, "fp32_contents", "FP32") is None
    assert grpc_servicer.decode_input(tensor, None).tolist() == [1.5, 2.5]


def test_rest_routes_and_error_statuses() -> None:
    async def main() -> None:
        backend, _ = fake_backend(CONFIG)
        server_metrics.label_models(backend.models.knows)  # as `gradserve serve` does
        app = create_app(CONFIG, backend, Tokens(CONFIG.auth))
        auth = {"authorization": "Bearer t0k"}
        x = np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)
        body = {"id": "q", "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/v2/health/ready")).json() == {"ready": True}
            assert (await http.get("/v2/models/digits")).status_code == 401
            meta = (await http.get("/v2/models/digits", headers=auth)).json()
            assert meta["parameters"]["selection.step"] == 300
            answer = (await http.post("/v2/models/digits/infer", json=body, headers=auth)).json()
            assert answer["id"] == "q"
            np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"]).reshape(2, 10), fake_logits(x),
                                       rtol=1e-6)
            assert (await http.post("/v2/models/nope/infer", json=body, headers=auth)).status_code == 404
            bad = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [1.0]}]}
            assert (await http.post("/v2/models/digits/infer", json=bad, headers=auth)).status_code == 400
            junk = await http.post("/v2/models/digits/infer", content=b"{not json", headers=auth)
            assert junk.status_code == 400 and junk.json()["error"]
            huge = await http.post("/v2/models/digits/infer", content=b"x" * 70000, headers=auth)
            assert huge.status_code == 413
            assert "/v2/models/{model}/infer" in (await http.get("/openapi.json", headers=auth)).json()["paths"]
            for path in ("/openapi.json", "/docs", "/metrics"):  # with a token set, only health is open
                assert (await http.get(path)).status_code == 401
            for timeout in ("nan", "inf", "-1", "0", "soon"):
                answer = await http.post("/v2/models/digits/infer", json=body, headers={**auth, "timeout": timeout})
                assert answer.status_code == 400 and "timeout must be" in answer.json()["error"]
            assert (await http.post("/v2/models/made-up-7f3a/infer", json=body, headers=auth)).status_code == 404
            metrics = (await http.get("/metrics", headers=auth)).text
            assert 'protocol="rest",status="NOT_FOUND"' in metrics
            assert 'model="_unknown"' in metrics and "made-up-7f3a" not in metrics  # made-up names: one label

    try:
        asyncio.run(main())
    finally:
        server_metrics.label_models(lambda model: True)


# --- BYTES tensors (encoded files) and the REST wire formats ---------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\xff binary \x00"  # not UTF-8: only raw (binary) transports carry it back
AUTH = (("authorization", "Bearer t0k"),)


def test_grpc_bytes_inputs_raw_and_typed_and_bytes_outputs_raw() -> None:
    async def body(torchserve: FakeTorchServe, target: str) -> None:
        images = objects(PNG, "ünïcode ✓".encode(), b"x" * 1000)
        async with Client(target, token="t0k") as client:
            out = await client.infer("files", images, input_name="image")
            assert out["class_name"].dtype == object and out["class_name"].shape == (3,)
            assert list(out["class_name"]) == [b"got:" + v for v in images]
            assert list(out["label"]) == [len(v) for v in images]
            pixels = np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32)  # the model's other input
            out = await client.infer("files", pixels)
            assert list(out["class_name"]) == [b"digit %d" % v for v in fake_logits(pixels).argmax(1)]
            empty = await code_of(client.infer("files", objects(PNG, b""), input_name="image"))
            assert empty == grpc.StatusCode.INVALID_ARGUMENT  # an empty file is no image
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            typed = pb.ModelInferRequest(model_name="files")
            typed.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([PNG, b"b"])
            np.testing.assert_array_equal(decode(await stub.ModelInfer(typed, metadata=AUTH))["class_name"],
                                          objects(b"got:" + PNG, b"got:b"))
            for shape, raw in [([3], codec.serialize_bytes(objects(PNG, b"b"))),  # 2 elements for a shape of 3
                               ([1], PNG)]:  # not length-prefixed
                bad = pb.ModelInferRequest(model_name="files", raw_input_contents=[raw])
                bad.inputs.add(name="image", datatype="BYTES", shape=shape)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(bad, metadata=AUTH)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "4-byte little-endian length" in caught.value.details()
            answer = await stub.ModelInfer(request("files", objects(b"next"), input_name="image"),
                                          metadata=AUTH)  # still serving
            assert decode(answer)["class_name"].tolist() == [b"got:next"]

    run_with_server(CONFIG, body)


def binary_request(request: dict, *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    """A body in Triton's binary tensor data extension, and its headers."""
    head = json.dumps(request).encode()
    return head + b"".join(chunks), {"authorization": "Bearer t0k", "inference-header-content-length": str(len(head))}


def read_binary_response(response: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """The JSON part of an answer in the binary extension, and each binary output's raw bytes."""
    n = int(response.headers["inference-header-content-length"])
    head, raw, at = json.loads(response.content[:n]), {}, n
    for output in head["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw[output["name"]], at = response.content[at:at + size], at + size
    assert at == len(response.content)
    return head, raw


def rest_app() -> FastAPI:
    return create_app(CONFIG, fake_backend(CONFIG)[0], Tokens(CONFIG.auth))


async def post(http: httpx.AsyncClient, model: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http.post(f"/v2/models/{model}/infer", content=content,
                           headers=headers or {"authorization": "Bearer t0k"})


def test_rest_bytes_as_text_and_base64_and_a_body_without_content_type() -> None:
    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rest_app()), base_url="http://t") as http:
            text = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["a.png", "数字"]}]}
            answer = await post(http, "files", text)
            assert "content-type" not in answer.request.headers  # as tritonclient.http sends it
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
            outputs = {o["name"]: o for o in answer.json()["outputs"]}
            assert outputs["class_name"] == {"name": "class_name", "datatype": "BYTES", "shape": [2],
                                             "data": ["got:a.png", "got:数字"]}
            assert outputs["label"]["data"] == [5, len("数字".encode())]
            files = ["ünïcode ✓".encode(), b"GIF89a"]
            encoded = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [
                base64.b64encode(f).decode() for f in files], "parameters": {"content_type": "base64"}}]}
            answer = await post(http, "files", encoded)
            assert [o["data"] for o in answer.json()["outputs"]][1] == ["got:ünïcode ✓", "got:GIF89a"]
            encoded["inputs"][0]["data"][1] = "not base64!"
            answer = await post(http, "files", encoded)
            assert answer.status_code == 400
            assert "input 'image': element 1 is not valid base64" in answer.json()["error"]
            not_utf8 = base64.b64encode(PNG).decode()  # the echo is not text: JSON cannot carry it back
            answer = await post(http, "files", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                            "data": [not_utf8],
                                                            "parameters": {"content_type": "base64"}}]})
            assert answer.status_code == 400 and "binary_data" in answer.json()["error"]
            numbers = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [3]}]}
            assert "BYTES values are strings" in (await post(http, "files", numbers)).json()["error"]

    asyncio.run(main())


def test_rest_binary_extension_inputs_and_outputs() -> None:
    async def main() -> None:
        x = np.random.default_rng(4).random((2, 1, 8, 8), dtype=np.float32)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rest_app()), base_url="http://t") as http:
            # FP32 in binary, every output in binary (what tritonclient.http sends by default)
            body, headers = binary_request({"id": "b1", "parameters": {"binary_data_output": True}, "inputs": [
                {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes())
            answer = await post(http, "digits", body, headers)
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
            head, raw = read_binary_response(answer)
            assert head["id"] == "b1" and set(raw) == {"logits", "label"}
            np.testing.assert_array_equal(np.frombuffer(raw["logits"], "<f4").reshape(2, 10), fake_logits(x))
            np.testing.assert_array_equal(np.frombuffer(raw["label"], "<i8"), fake_logits(x).argmax(1))
            # BYTES in binary; one output binary, the other JSON (an output's own choice overrides the default)
            files = objects(PNG, b"second file")
            serialized = codec.serialize_bytes(files)
            body, headers = binary_request({"inputs": [
                {"name": "image", "shape": [2], "datatype": "BYTES",
                 "parameters": {"binary_data_size": len(serialized)}}],
                "outputs": [{"name": "class_name", "parameters": {"binary_data": True}},
                            {"name": "label", "parameters": {"binary_data": False}}]}, serialized)
            head, raw = read_binary_response(await post(http, "files", body, headers))
            assert [o["name"] for o in head["outputs"]] == ["class_name", "label"]
            assert head["outputs"][0]["datatype"] == "BYTES" and head["outputs"][1]["data"] == [len(PNG), 11]
            assert codec.deserialize_bytes(raw["class_name"], 2).tolist() == [b"got:" + PNG, b"got:second file"]
            # binary inputs with JSON outputs: a plain JSON answer
            body, headers = binary_request({"inputs": [
                {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes())
            answer = await post(http, "digits", body, headers)
            assert "inference-header-content-length" not in answer.headers
            np.testing.assert_allclose(np.reshape(answer.json()["outputs"][0]["data"], (2, 10)), fake_logits(x),
                                       rtol=1e-6)

    asyncio.run(main())


X1 = np.ones((1, 1, 8, 8), np.float32)
FP32_BINARY = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}


@pytest.mark.parametrize(("body", "header", "words"), [
    (b'{"inputs": []}', "999", "Inference-Header-Content-Length is 999 but the body has only 14 bytes"),
    (b'{"inputs": []}', "twelve", "Inference-Header-Content-Length must be the byte length of the JSON"),
    (json.dumps({"inputs": [FP32_BINARY]}).encode(), None,
     "binary_data_size but the request has no Inference-Header-Content-Length"),
    (json.dumps({"inputs": [FP32_BINARY]}).encode() + X1.tobytes(), None,
     "binary tensor data may follow it only with the header Inference-Header-Content-Length"),
    (json.dumps({"inputs": [FP32_BINARY]}).encode() + X1.tobytes()[:100], "len",
     "binary_data_size is 256 but only 100 bytes of binary data are left"),
    (json.dumps({"inputs": [{**FP32_BINARY, "parameters": {"binary_data_size": 128}}]}).encode() + X1.tobytes()[:128],
     "len", "shape [1, 1, 8, 8] of FP32 needs 256 bytes, got 128"),
    (json.dumps({"inputs": [FP32_BINARY]}).encode() + X1.tobytes() + b"extra", "len",
     "5 bytes after the JSON request that no input's parameters.binary_data_size accounts for"),
    (json.dumps({"inputs": [{**FP32_BINARY, "parameters": {"binary_data_size": "256"}}]}).encode() + X1.tobytes(),
     "len", "binary_data_size must be a byte count"),
    (json.dumps({"inputs": [{**FP32_BINARY, "data": [1.0] * 64}]}).encode() + X1.tobytes(), "len",
     "send data or parameters.binary_data_size, not both"),
    (json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                             "parameters": {"binary_data_size": 9}}]}).encode() + struct.pack("<I", 5) + b"abcde",
     "len", "input 'image': shape [2] needs 2 BYTES elements"),
    (b'{"inputs": [' + b"[" * 60000, None, "the JSON request is not valid JSON"),
    (b"\xff\xfe not utf-8", None, "the JSON request is not valid JSON"),
    (b'["inputs"]', None, "the JSON request must be an object"),
    (b'{"inputs": {}}', None, "the request has no list of inputs"),
    (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', None, "inputs[0] must be an object with a"),
    (b'{"inputs": [{"name": "input", "shape": "1,1,8,8", "datatype": "FP32", "data": [1]}]}', None,
     "input 'input': shape must be a list of integers"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": 32, "data": [1]}]}', None, "datatype must be a string"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": 1}]}', None, "data must be a list"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1], "parameters": 7}]}', None,
     "parameters must be an object"),
    (json.dumps({"id": 5, "inputs": [{**FP32_BINARY, "parameters": None, "data": [1.0] * 64}]}).encode(), None,
     "the request's id must be a string"),
    (json.dumps({"inputs": [{**FP32_BINARY, "parameters": None, "data": [1.0] * 64}], "outputs": ["label"]}).encode(),
     None, "outputs[0] must be an object with a string name"),
    (json.dumps({"inputs": [{**FP32_BINARY, "parameters": None, "data": [1.0] * 64}],
                 "parameters": {"binary_data_output": "yes"}}).encode(), None, "binary_data_output must be true or"),
])
def test_rest_malformed_bodies_are_400_with_what_is_wrong_and_the_server_goes_on(body: bytes, header: str | None,
                                                                                  words: str) -> None:
    async def main() -> None:
        headers = {"authorization": "Bearer t0k"}
        if header is not None:  # "len": the JSON's true length
            headers["inference-header-content-length"] = str(body.index(b"}]}") + 3) if header == "len" else header
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rest_app()), base_url="http://t") as http:
            answer = await post(http, "digits", body, headers)
            assert answer.status_code == 400, answer.text
            assert words in answer.json()["error"]
            good, headers = binary_request({"inputs": [FP32_BINARY]}, X1.tobytes())
            assert (await post(http, "digits", good, headers)).status_code == 200

    asyncio.run(main())


def test_rest_compressed_and_chunked_bodies_keep_the_size_limit() -> None:
    async def main() -> None:
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        plain = json.dumps(body).encode()
        auth = {"authorization": "Bearer t0k"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rest_app()), base_url="http://t") as http:
            for encoding, packed in [("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))]:
                answer = await post(http, "digits", packed, {**auth, "content-encoding": encoding})
                assert answer.status_code == 200, answer.text
            bomb = gzip.compress(b" " * 200_000)  # a few hundred bytes that inflate past the 64 KiB limit
            assert (await post(http, "digits", bomb, {**auth, "content-encoding": "gzip"})).status_code == 413
            assert (await post(http, "digits", plain, {**auth, "content-encoding": "br"})).status_code == 400
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(2):
                    yield b" " * 40_000

            chunked = await http.post("/v2/models/digits/infer", content=chunks(), headers=auth)  # no length
            assert "content-length" not in chunked.request.headers and chunked.status_code == 413
            huge, headers = binary_request({"inputs": [FP32_BINARY]}, b"\0" * 70_000)
            assert (await post(http, "digits", huge, headers)).status_code == 413

    asyncio.run(main())


def test_rest_openapi_documents_the_inference_bodies() -> None:
    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rest_app()), base_url="http://t") as http:
            spec = (await http.get("/openapi.json", headers={"authorization": "Bearer t0k"})).json()
        infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
        ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schemas = spec["components"]["schemas"]
        request_schema = schemas[ref.rsplit("/", 1)[1]]
        assert {"inputs", "outputs", "parameters", "id"} <= set(request_schema["properties"])
        assert request_schema["properties"]["inputs"]["items"]["$ref"].rsplit("/", 1)[1] in schemas
        assert "application/octet-stream" in infer["responses"]["200"]["content"]
        assert "/v2/models/{model}/versions/{version}/infer" in spec["paths"]

    asyncio.run(main())


def test_fewer_than_one_front_door_process_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"listen.processes must be 1 or more"):
        build(ServeConfig, {"listen": {"processes": 0}})


def test_further_front_door_processes_get_the_configuration_as_it_was_built(tmp_path: Path) -> None:
    """server/doors.py sends the first process's configuration as JSON; the others build it back alike."""
    config = build(ServeConfig, {"model_store": str(tmp_path), "default_versions": {"m": "2"},
                                 "listen": {"processes": 3, "tls_cert": "c.pem", "tls_key": "k.pem"},
                                 "torchserve": {"jvm_options": ["-Xmx2g"], "gpus": 0}, "coalesce": {"max_rows": 0}},
                   {"auth.token": "secret"})
    assert build(ServeConfig, json.loads(json.dumps(dataclasses.asdict(config))), env={}) == config


def test_a_port_is_checked_before_processes_share_it() -> None:
    """Listeners that share a port (SO_REUSEPORT) would join another server's that shares it too: the first
    front-door process checks that the port is free before its listener joins."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError, match=r"cannot listen on 127.0.0.1:\d+: the port is taken"):
            check_port_free("127.0.0.1", other.getsockname()[1])
        port = other.getsockname()[1]
    check_port_free("127.0.0.1", port)  # closed: free again
