"""The front door on the real stack: `gradserve serve` as a subprocess, TorchServe (Java) as its child, an
archive built by `gradserve package` from a real run. Every row of the error table comes from a real request.

One front door serves most tests (module scope); the SIGTERM test runs its own. The tritonclient tests live
in tests/client/ (their own pytest process: tritonclient's `inference` protos clash with ours).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import torch
from frontdoor_fixtures import GRADSERVE, TOKEN, FrontDoor, built_store, digits, running_front_door, selected_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.grpc_client import Client, decode, request
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_MESSAGE = 1024 * 1024
MAX_IN_FLIGHT = 4


def with_broken_model(store: Path, into: Path) -> Path:
    """A copy of the store plus `broken.mar`: digits.mar whose manifest promises an output the handler never
    makes, so asking for it is a real request that fails inside the server (the INTERNAL row)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(store / "digits.mar", into / "digits.mar")
    with zipfile.ZipFile(store / "digits.mar") as src, zipfile.ZipFile(into / "broken.mar", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "gradserve.json":
                manifest = json.loads(data)
                manifest["name"] = "broken"
                manifest["outputs"].append({"name": "embedding", "datatype": "FP32", "shape": [-1, 64]})
                data = json.dumps(manifest).encode()
            elif item.filename == "MAR-INF/MANIFEST.json":
                mar = json.loads(data)
                mar["model"]["modelName"] = "broken"
                data = json.dumps(mar).encode()
            dst.writestr(item, data)
    return into


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    store = built_store(tmp_path_factory)
    models = with_broken_model(store.path, tmp_path_factory.mktemp("store-e2e"))
    with running_front_door(models, tmp_path_factory.mktemp("door"), TOKEN,
                            "--token-expiration-min", "0.25", "--max-message-bytes", str(MAX_MESSAGE),
                            "--max-in-flight", str(MAX_IN_FLIGHT)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(door: FrontDoor) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(door.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return selected_model(built_store(tmp_path_factory).run)


def images(n: int, start: int = 0) -> np.ndarray:
    return np.ascontiguousarray(digits()[0][start:start + n])  # (n, 1, 8, 8) float32 in [0, 1]


def expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- health, metadata, inference ---------------------------------------------------------------------------

def test_health_serving_without_token_and_reflection_lists_services(door: FrontDoor) -> None:
    with grpc.insecure_channel(door.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, metadata=AUTH)
        services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert httpx.get(f"{door.http_url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{door.http_url}/v2/health/ready").json() == {"ready": True}


def test_metadata_from_the_manifest(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=5, metadata=AUTH)
    assert (meta.name, list(meta.versions), meta.platform) == ("digits", ["1.0"], "pytorch_torchserve")
    # the pixels, or (an image model) the image files themselves
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 8, 8]),
                                                                         ("image", "BYTES", [-1])]
    assert [t.name for t in meta.outputs] == ["logits", "label", "probabilities", "class_name"]
    assert meta.parameters["record.step"].int64_param > 0
    assert meta.parameters["selection.rule_satisfied"].bool_param is True
    assert len(meta.parameters["weights_sha256"].string_param) == 64
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=5, metadata=AUTH).ready
    rest = httpx.get(f"{door.http_url}/v2/models/digits", headers=door.headers).json()
    assert rest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
                              {"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert rest["parameters"]["weights_sha256"] == meta.parameters["weights_sha256"].string_param


def test_raw_and_typed_inputs_equal_the_training_model(stub: pb_grpc.GRPCInferenceServiceStub,
                                                       reference: torch.nn.Module) -> None:
    x = images(40)
    want = expected(reference, x)
    raw = decode(stub.ModelInfer(request("digits", x, request_id="raw-1"), timeout=30, metadata=AUTH))
    typed_request = pb.ModelInferRequest(model_name="digits", id="typed-1")
    typed_request.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel())
    typed_response = stub.ModelInfer(typed_request, timeout=30, metadata=AUTH)
    assert typed_response.id == "typed-1"
    typed = decode(typed_response)
    for out in (raw, typed):
        assert np.abs(out["logits"] - want).max() <= 1e-5
        assert (out["label"] == want.argmax(1)).all()
        np.testing.assert_allclose(out["probabilities"], torch.from_numpy(want).softmax(1).numpy(), atol=1e-6)


def test_requested_outputs_and_request_id(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(request("digits", images(3), ["label"], request_id="abc"), timeout=30,
                               metadata=AUTH)
    assert response.id == "abc" and response.model_version == "1.0"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("label", "INT64", [3])]


def test_stream_reports_a_bad_request_in_its_own_response(stub: pb_grpc.GRPCInferenceServiceStub,
                                                          reference: torch.nn.Module) -> None:
    good_1, good_2 = images(2), images(3, start=10)
    bad = request("digits", np.zeros((2, 1, 8, 7), np.float32), request_id="bad")
    answers = list(stub.ModelStreamInfer(iter([request("digits", good_1, request_id="a"), bad,
                                               request("digits", good_2, request_id="b")]),
                                         timeout=30, metadata=AUTH))
    assert [a.infer_response.id for a in answers] == ["a", "bad", "b"]
    assert answers[1].error_message.startswith("INVALID_ARGUMENT") and "[n, 1, 8, 8]" in answers[1].error_message
    for answer, x in ((answers[0], good_1), (answers[2], good_2)):
        assert answer.error_message == ""
        assert np.abs(decode(answer.infer_response)["logits"] - expected(reference, x)).max() <= 1e-5


def test_rest_inference_equals_the_training_model(door: FrontDoor, reference: torch.nn.Module) -> None:
    x = images(5, start=100)
    body = {"id": "r-7", "inputs": [{"name": "input", "shape": [5, 1, 8, 8], "datatype": "FP32",
                                     "data": x.tolist()}],  # nested lists are fine
            "outputs": [{"name": "logits"}, {"name": "label"}]}
    answer = httpx.post(f"{door.http_url}/v2/models/digits/infer", json=body, headers=door.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["id"] == "r-7" and [o["name"] for o in data["outputs"]] == ["logits", "label"]
    logits = np.asarray(data["outputs"][0]["data"], np.float32).reshape(data["outputs"][0]["shape"])
    assert np.abs(logits - expected(reference, x)).max() <= 1e-5
    spec = httpx.get(f"{door.http_url}/openapi.json", headers=door.headers).json()  # docs need the token too
    assert "/v2/models/{model}/infer" in spec["paths"]


def test_a_large_request_reaches_the_handler_through_shared_memory(stub: pb_grpc.GRPCInferenceServiceStub,
                                                                   door: FrontDoor, reference: torch.nn.Module) -> None:
    def shared() -> float:
        text = httpx.get(f"{door.http_url}/metrics", headers=door.headers).text
        line = next((x for x in text.splitlines() if x.startswith('gradserve_backend_calls_total{payload="shared')),
                    "0 0")
        return float(line.split()[-1])

    before = shared()
    files = []
    for start in (0, 300):  # 300 rows of 256 bytes: past the 64 KiB from which a request goes by shared memory
        x = images(300, start)
        out = decode(stub.ModelInfer(request("digits", x), timeout=30, metadata=AUTH))
        assert np.abs(out["logits"] - expected(reference, x)).max() <= 1e-5
        (area,) = Path("/dev/shm").glob(f"gradserve-payloads-{door.process.pid}-*")  # the front door's own
        files.append(list(area.iterdir()))
    assert shared() == before + 2
    assert files[0] and files[1] == files[0]  # no new file: the first call's, kept, carried the second's rows


def test_metrics_count_requests_rows_and_batches(door: FrontDoor) -> None:
    text = httpx.get(f"{door.http_url}/metrics", headers=door.headers).text
    assert 'gradserve_requests_total{method="ModelInfer",model="digits",protocol="grpc",status="OK"}' in text
    assert "gradserve_request_seconds_bucket" in text and "gradserve_request_rows_bucket" in text
    assert 'gradserve_backend_batch_rows_count{model="digits"}' in text
    assert httpx.get(f"{door.http_url}/metrics").status_code == 401


def test_predict_cli_over_grpc_and_http(door: FrontDoor, tmp_path: Path) -> None:
    x, y = digits()
    np.save(tmp_path / "x.npy", x[:4])
    (tmp_path / "x.json").write_text(json.dumps(x[:4].tolist()))
    runs = [["--input", str(tmp_path / "x.npy"), "--grpc", door.grpc_target],
            ["--input", str(tmp_path / "x.json"), "--http", door.http_url]]
    for args in runs:
        out = subprocess.run([str(GRADSERVE), "predict", *args, "--token", TOKEN], capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
        rows = [json.loads(line) for line in out]
        assert [r["row"] for r in rows] == [0, 1, 2, 3]
        assert sum(r["label"] == str(label) for r, label in zip(rows, y[:4], strict=True)) >= 3


def test_torchserve_keys_are_renewed_before_they_expire(door: FrontDoor, stub: pb_grpc.GRPCInferenceServiceStub
                                                        ) -> None:
    key_file = door.workdir / "torchserve" / "key_file.json"
    first = json.loads(key_file.read_text())["inference"]["key"]
    time.sleep(16)  # the keys live 15 s in this front door
    assert json.loads(key_file.read_text())["inference"]["key"] != first
    assert len(decode(stub.ModelInfer(request("digits", images(2)), timeout=30, metadata=AUTH))["label"]) == 2


# --- the error table, row by row -----------------------------------------------------------------------------

def grpc_code(stub: pb_grpc.GRPCInferenceServiceStub, message: pb.ModelInferRequest,
              metadata: tuple = AUTH, timeout: float = 30) -> grpc.StatusCode:
    try:
        stub.ModelInfer(message, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        assert e.details(), "every error says what went wrong"
        return e.code()
    return grpc.StatusCode.OK


def rest_status(door: FrontDoor, model: str, x: np.ndarray, headers: dict | None = None, **extra: object) -> int:
    body = {"inputs": [{"name": extra.pop("name", "input"), "shape": list(x.shape),
                        "datatype": extra.pop("datatype", "FP32"), "data": x.ravel().tolist()}], **extra}
    headers = {**(door.headers if headers is None else headers), "content-type": "application/json"}
    # json.dumps writes NaN as the literal NaN, which Python's JSON parser (the server's) accepts.
    answer = httpx.post(f"{door.http_url}/v2/models/{model}/infer", content=json.dumps(body), headers=headers,
                        timeout=30)
    if answer.status_code != 200:
        assert answer.json()["error"]
    return answer.status_code


@pytest.mark.parametrize("case", ["shape", "datatype", "name", "non-finite", "too many rows"])
def test_invalid_input(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor, case: str) -> None:
    x = images(2)
    name, datatype = "input", "FP32"
    if case == "shape":
        x = np.zeros((2, 1, 8, 7), np.float32)
    elif case == "datatype":
        x, datatype = x.astype(np.float64), "FP64"
    elif case == "name":
        name = "pixels"
    elif case == "non-finite":
        x = x.copy()
        x[1, 0, 3, 3] = np.nan
    else:
        x = np.zeros((1025, 1, 8, 8), np.float32)
    assert grpc_code(stub, request("digits", x, input_name=name)) == grpc.StatusCode.INVALID_ARGUMENT
    assert rest_status(door, "digits", x, name=name, datatype=datatype) == 400


def test_unknown_model_or_version(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    assert grpc_code(stub, request("nope", images(1))) == grpc.StatusCode.NOT_FOUND
    versioned = request("digits", images(1))
    versioned.model_version = "9.9"
    assert grpc_code(stub, versioned) == grpc.StatusCode.NOT_FOUND
    assert rest_status(door, "nope", images(1)) == 404
    assert httpx.get(f"{door.http_url}/v2/models/digits/versions/9.9", headers=door.headers).status_code == 404


def test_missing_or_wrong_credentials(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        assert grpc_code(stub, request("digits", images(1)), metadata) == grpc.StatusCode.UNAUTHENTICATED
    assert rest_status(door, "digits", images(1), headers={}) == 401
    assert rest_status(door, "digits", images(1), headers={"authorization": "Bearer wrong"}) == 401


def test_message_too_large(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    x = np.zeros((2 * MAX_MESSAGE // 256, 1, 8, 8), np.float32)  # 2 MiB against a 1 MiB limit
    assert grpc_code(stub, request("digits", x)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rest_status(door, "digits", x) == 413


def test_overloaded(door: FrontDoor) -> None:
    """More concurrent requests than --max-in-flight: the excess is refused, the rest answered."""
    x = np.repeat(images(64), 16, axis=0)  # 1024 rows: slow enough to pile up

    async def burst() -> list[grpc.StatusCode]:
        async with Client(door.grpc_target, token=TOKEN, timeout=60) as client:
            async def one() -> grpc.StatusCode:
                try:
                    await client.infer("digits", x)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    return e.code()
            return await asyncio.gather(*(one() for _ in range(4 * MAX_IN_FLIGHT)))

    codes = asyncio.run(burst())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}

    async def rest_burst() -> list[int]:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        async with httpx.AsyncClient(base_url=door.http_url, headers=door.headers, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/v2/models/digits/infer", json=body)
                                             for _ in range(4 * MAX_IN_FLIGHT)))
        return [a.status_code for a in answers]

    statuses = asyncio.run(rest_burst())
    assert 429 in statuses and set(statuses) <= {200, 429}


def test_deadline_exceeded(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    x = np.repeat(images(64), 16, axis=0)
    assert grpc_code(stub, request("digits", x), timeout=0.002) == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = httpx.post(f"{door.http_url}/v2/models/digits/infer", headers={**door.headers, "timeout": "0.0005"},
                        json={"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                          "data": x.ravel().tolist()}]}, timeout=30)
    assert answer.status_code == 504 and "deadline" in answer.json()["error"]


def test_internal_error_is_generic(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor) -> None:
    message = request("broken", images(2), ["embedding"])
    try:
        stub.ModelInfer(message, timeout=30, metadata=AUTH)
        raise AssertionError("expected INTERNAL")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INTERNAL
        assert "embedding" not in e.details() and "log" in e.details()  # generic: no internals leak
    body = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                        "data": images(2).ravel().tolist()}], "outputs": [{"name": "embedding"}]}
    answer = httpx.post(f"{door.http_url}/v2/models/broken/infer", json=body, headers=door.headers, timeout=30)
    assert answer.status_code == 500
    assert "Traceback" in door.log_tail(400)


def test_backend_down_is_unavailable_then_restarted(stub: pb_grpc.GRPCInferenceServiceStub, door: FrontDoor
                                                    ) -> None:
    """Kill TorchServe: readiness and health turn false, requests get UNAVAILABLE / 503, and the supervisor
    brings it back (this test runs last in the module: it restarts the backend)."""
    torchserve = door.torchserve()
    assert torchserve is not None
    torchserve.kill()
    deadline = time.monotonic() + 20
    while stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert grpc_code(stub, request("digits", images(1))) == grpc.StatusCode.UNAVAILABLE
    assert rest_status(door, "digits", images(1)) == 503
    assert httpx.get(f"{door.http_url}/v2/health/ready").status_code == 503
    with grpc.insecure_channel(door.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING

    door.wait_ready(180)
    assert len(decode(stub.ModelInfer(request("digits", images(2)), timeout=30, metadata=AUTH))["label"]) == 2
    assert not psutil.pid_exists(torchserve.pid) or torchserve.status() == psutil.STATUS_ZOMBIE


# --- SIGTERM under load --------------------------------------------------------------------------------------

def test_sigterm_during_load_loses_no_accepted_request(tmp_path_factory: pytest.TempPathFactory) -> None:
    store = built_store(tmp_path_factory)
    with running_front_door(store.path, tmp_path_factory.mktemp("door-sigterm"), None) as door:
        torchserve = door.torchserve()
        assert torchserve is not None
        results: list[tuple[float, grpc.StatusCode]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(door.grpc_target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while not stop.is_set():
                    started = time.monotonic()
                    code = grpc_code(stub, request("digits", images(8)), metadata=(), timeout=30)
                    with lock:
                        results.append((started, code))
                    if code != grpc.StatusCode.OK:
                        return

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        signalled = time.monotonic()
        door.process.send_signal(signal.SIGTERM)
        assert door.process.wait(60) == 0
        assert not list(Path("/dev/shm").glob(f"gradserve-payloads-{door.process.pid}-*"))  # removed on the way out
        stop.set()
        for t in threads:
            t.join(60)
    before = [code for started, code in results if started < signalled - 0.05]
    assert len(before) > 8 and all(code == grpc.StatusCode.OK for code in before), before
    after = {code for started, code in results if started >= signalled - 0.05}
    assert after <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, after
    assert not torchserve.is_running() or torchserve.status() == psutil.STATUS_ZOMBIE


def test_torchserve_goes_down_with_a_sigkilled_front_door(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGKILL leaves the front door no chance to stop its TorchServe: the guard TorchServe runs under
    (server/torchserve/guard.py) sees its pipe close and stops the JVM and its workers, freeing their ports."""
    store = built_store(tmp_path_factory)
    with running_front_door(store.path, tmp_path_factory.mktemp("door-sigkill"), None) as door:
        tree = [p for p in psutil.Process(door.process.pid).children(recursive=True)]
        assert any("java" in p.name() for p in tree), tree
        door.process.kill()
        door.process.wait(10)
        deadline = time.monotonic() + 30
        while (alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [(p.pid, p.name()) for p in alive]
