"""Unit tests of the front door's parts against an in-process fake of TorchServe (the real stack is tested in
test_frontdoor_e2e.py): the error table, TorchServe's client, the coalescer, the gRPC servicer and the REST app
on free ports."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from client.grpc_client import Client, decode, request
from gradserve.config import build
from handlers import codec
from handlers.manifest import Manifest
from server import errors
from server.backend import Backend
from server.coalescer import Coalescer
from server.config import Coalesce, Limits, Listen, ServeConfig
from server.errors import InvalidInput
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc
from server.generated import torchserve_pb2_grpc
from server.grpc_server import create_server
from server.models import ServedModel
from server.rest import create_app
from server.torchserve.client import TorchServeClient, backend_error
from server.torchserve.process import Endpoint

MANIFEST = {
    "name": "digits", "version": "1.0", "platform": "pytorch_torchserve", "max_rows": 16, "labels": list("0123456789"),
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                {"name": "label", "datatype": "INT64", "shape": [-1]}],
    "selection": {"step": 300, "rule_satisfied": True, "record": {"step": 300, "grad_norm": 0.5}},
    "weights": {"file": "weights.pt", "sha256": "ab" * 32},
}


def fake_logits(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(len(rows), -1)[:, :10] * 2 + 1  # (N, 10), a function of each row alone


class FakeTorchServe:
    """TorchServe's client replaced by a function of the rows (and knobs to misbehave); the real Backend
    receives it through its constructor."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail, self.calls = delay, fail, []
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
        rows = codec.decode(payload).tensors["input"]
        self.calls.append(len(rows))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if (rows == -1).any():  # a poisoned row the door let through: the handler refuses the whole call
            return codec.encode_error(codec.INVALID_ARGUMENT, "row with -1")
        logits = fake_logits(rows)
        return codec.encode({"logits": logits, "label": logits.argmax(1).astype(np.int64)})


def registry() -> dict[str, ServedModel]:
    return {"digits": ServedModel(Manifest.from_dict(MANIFEST), Path("digits.mar"))}


def fake_backend(config: ServeConfig, **fake: object) -> tuple[Backend, FakeTorchServe]:
    torchserve = FakeTorchServe(**fake)  # type: ignore[arg-type]
    return Backend(config, registry(), torchserve), torchserve


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


@pytest.mark.parametrize(("code", "details", "expected"), [
    (grpc.StatusCode.DEADLINE_EXCEEDED, "", errors.DeadlineExceeded),
    (grpc.StatusCode.UNAVAILABLE, "", errors.Unavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Worker died.", errors.Unavailable),  # exit 137 already seen
    (grpc.StatusCode.INTERNAL, "Worker died.", errors.Unavailable),  # exit code not yet seen
    (grpc.StatusCode.INTERNAL, "NullPointerException", RuntimeError),  # a bug somewhere: INTERNAL, logged
])
def test_torchserve_failures_map_to_what_a_caller_can_act_on(code: grpc.StatusCode, details: str,
                                                              expected: type[Exception]) -> None:
    failure = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    assert type(backend_error(failure)) is expected


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


def test_torchserve_dying_under_calls_answers_them_unavailable(tmp_path: Path) -> None:
    """TorchServe dies with calls in flight: the supervisor's `stop` closes the channel under them, which
    grpc.aio reports as a cancellation of the awaiting task. Each caller must still get an answer (UNAVAILABLE,
    at once), not a cancelled RPC that its client sees only as a deadline passing."""
    class Hanging(torchserve_pb2_grpc.InferenceAPIsServiceServicer):
        async def Predictions(self, request, context):  # type: ignore[no-untyped-def]
            await asyncio.sleep(30)

    async def main() -> None:
        server = grpc.aio.server()
        torchserve_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Hanging(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        management, url = await fake_management_api()
        client = TorchServeClient()
        config = ServeConfig(coalesce=Coalesce(max_rows=64, max_calls=1))
        backend = Backend(config, registry(), client)
        await client.connect(Endpoint(f"127.0.0.1:{port}", url, url, write_key_file(tmp_path / "keys.json")),
                             ["digits"])
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
            await server.stop(0)
            management.close()

    asyncio.run(main())


# --- the coalescer --------------------------------------------------------------------------------------------

def test_coalescer_groups_concurrent_rows_and_gives_each_caller_its_own() -> None:
    calls: list[int] = []

    async def call(rows: np.ndarray, deadline: float) -> dict[str, np.ndarray]:
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


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def call(rows: np.ndarray, deadline: float) -> dict[str, np.ndarray]:
        return {"y": rows}

    async def main() -> float:
        coalescer = Coalescer(call, max_rows=64, max_delay_s=0.5, max_calls=2)
        start = time.perf_counter()
        await coalescer.submit(np.zeros((1, 2)), 1e9)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.1  # far below the 0.5 s delay bound



def test_a_cancelled_group_call_answers_its_members_unavailable() -> None:
    async def call(rows: np.ndarray, deadline: float) -> dict[str, np.ndarray]:
        await asyncio.sleep(30)
        return {"y": rows}

    async def main() -> list[BaseException]:
        coalescer = Coalescer(call, max_rows=64, max_delay_s=0.001, max_calls=1)
        members = [asyncio.create_task(coalescer.submit(np.zeros((1, 2)), 1e9)) for _ in range(3)]
        await asyncio.sleep(0.05)
        for task in list(coalescer._tasks):  # e.g. the loop shutting down
            task.cancel()
        return await asyncio.wait_for(asyncio.gather(*members, return_exceptions=True), 2)

    assert all(isinstance(r, errors.Unavailable) for r in asyncio.run(main()))

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
        server, port = create_server(config, backend)
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


def test_rest_routes_and_error_statuses() -> None:
    async def main() -> None:
        backend, _ = fake_backend(CONFIG)
        app = create_app(CONFIG, backend)
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
            assert "/v2/models/{model}/infer" in (await http.get("/openapi.json")).json()["paths"]
            metrics = (await http.get("/metrics", headers=auth)).text
            assert 'protocol="rest",status="NOT_FOUND"' in metrics

    asyncio.run(main())
