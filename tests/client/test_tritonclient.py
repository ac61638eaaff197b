"""Unmodified Open Inference Protocol clients (tritonclient.grpc and tritonclient.http, in JSON and in binary
mode) against the real front door subprocess.

Imports no gradserve protobuf stubs (see conftest.py); run with `pytest tests/client`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import queue
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from frontdoor_fixtures import TOKEN, FrontDoor, built_store, digits, running_front_door, selected_model
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow
HEADERS = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    store = built_store(tmp_path_factory)
    with running_front_door(store.path, tmp_path_factory.mktemp("door-triton"), TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def client(door: FrontDoor) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(door.grpc_target) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return selected_model(built_store(tmp_path_factory).run)


def inputs(x: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def logits_of(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_readiness_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits", headers=HEADERS)
    meta = client.get_model_metadata("digits", headers=HEADERS)
    assert meta.name == "digits" and list(meta.versions) == ["1.0"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 8, 8]),
                                                                         ("image", "BYTES", [-1])]
    assert {t.name for t in meta.outputs} == {"logits", "label", "probabilities", "class_name"}
    assert client.get_server_metadata(headers=HEADERS).name == "gradserve"


def test_infer_equals_the_training_model(client: triton.InferenceServerClient, reference: torch.nn.Module) -> None:
    x = np.ascontiguousarray(digits()[0][:16])
    result = client.infer("digits", inputs(x), request_id="t-1", headers=HEADERS,
                          outputs=[triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("label")],
                          client_timeout=30)
    assert result.get_response().id == "t-1"
    assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5
    assert result.as_numpy("probabilities") is None  # not requested, not sent


def test_infer_without_token_is_refused(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("digits", inputs(np.zeros((1, 1, 8, 8), np.float32)))
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"


def test_async_infer(client: triton.InferenceServerClient, reference: torch.nn.Module) -> None:
    answers: queue.Queue = queue.Queue()
    xs = [np.ascontiguousarray(digits()[0][i * 4:(i + 1) * 4]) for i in range(5)]
    for i, x in enumerate(xs):
        client.async_infer("digits", inputs(x), callback=lambda result, error, i=i: answers.put((i, result, error)),
                           request_id=str(i), headers=HEADERS, client_timeout=30)
    got = dict((i, (result, error)) for i, result, error in (answers.get(timeout=60) for _ in xs))
    for i, x in enumerate(xs):
        result, error = got[i]
        assert error is None and result.get_response().id == str(i)
        assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5


def test_aio_client(door: FrontDoor) -> None:
    async def main() -> np.ndarray:
        async with triton_aio.InferenceServerClient(door.grpc_target) as c:
            tensor = triton_aio.InferInput("input", [2, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(digits()[0][:2]))
            return (await c.infer("digits", [tensor], headers=HEADERS)).as_numpy("label")

    assert asyncio.run(main()).shape == (2,)


def test_stream_with_a_malformed_request_in_the_middle(client: triton.InferenceServerClient,
                                                       reference: torch.nn.Module) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=HEADERS)
    try:
        good = np.ascontiguousarray(digits()[0][:3])
        client.async_stream_infer("digits", inputs(good), request_id="a")
        bad = triton.InferInput("input", [3, 1, 8, 7], "FP32")
        bad.set_data_from_numpy(np.zeros((3, 1, 8, 7), np.float32))
        client.async_stream_infer("digits", [bad], request_id="b")
        client.async_stream_infer("digits", inputs(good), request_id="c")
        got = [answers.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
    results = [r for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0].message() and "[n, 1, 8, 8]" in errors[0].message()
    assert sorted(r.get_response().id for r in results) == ["a", "c"]
    for r in results:
        assert np.abs(r.as_numpy("logits") - logits_of(reference, good)).max() <= 1e-5


# --- tritonclient.http ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_client(door: FrontDoor) -> Iterator[triton_http.InferenceServerClient]:
    c = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"), concurrency=4)
    try:
        yield c
    finally:
        c.close()


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient.http writes its own headers (Inference-Header-Content-Length,
    Content-Encoding) into the dict it is given, which would leak into the next request."""
    return dict(HEADERS)


def http_inputs(x: np.ndarray, binary: bool) -> list[triton_http.InferInput]:
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return [tensor]


def test_http_readiness_and_metadata(http_client: triton_http.InferenceServerClient) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready("digits", headers=auth())
    meta = http_client.get_model_metadata("digits", headers=auth())
    assert meta["name"] == "digits" and meta["inputs"][0] == {"name": "input", "datatype": "FP32",
                                                              "shape": [-1, 1, 8, 8]}
    assert "binary_tensor_data" in http_client.get_server_metadata(headers=auth())["extensions"]


def test_http_json_mode_equals_the_training_model(http_client: triton_http.InferenceServerClient,
                                                  reference: torch.nn.Module) -> None:
    """binary_data=False for the input and the outputs: the whole exchange is JSON."""
    x = np.ascontiguousarray(digits()[0][:16])
    outputs = [triton_http.InferRequestedOutput(name, binary_data=False) for name in ("logits", "label")]
    result = http_client.infer("digits", http_inputs(x, binary=False), outputs=outputs, request_id="j-1",
                               headers=auth())
    response = result.get_response()
    assert response["id"] == "j-1" and all("data" in o and "parameters" not in o for o in response["outputs"])
    assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5
    assert (result.as_numpy("label") == logits_of(reference, x).argmax(1)).all()
    assert result.as_numpy("probabilities") is None  # not requested, not sent


def test_http_binary_mode_equals_the_training_model(http_client: triton_http.InferenceServerClient,
                                                    reference: torch.nn.Module) -> None:
    """tritonclient.http's defaults: the input as binary data after the JSON, every output back as binary."""
    x = np.ascontiguousarray(digits()[0][16:40])
    result = http_client.infer("digits", http_inputs(x, binary=True), request_id="b-1", headers=auth())
    response = result.get_response()
    assert response["id"] == "b-1" and {"logits", "label", "probabilities"} <= {o["name"] for o in
                                                                                response["outputs"]}
    assert all(o["parameters"]["binary_data_size"] > 0 and "data" not in o for o in response["outputs"])
    assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5
    probabilities = torch.softmax(torch.from_numpy(logits_of(reference, x)), 1).numpy()
    assert np.abs(result.as_numpy("probabilities") - probabilities).max() <= 1e-5
    # a binary input with one output binary and the other JSON, gzip-compressed both ways
    outputs = [triton_http.InferRequestedOutput("logits", binary_data=True),
               triton_http.InferRequestedOutput("label", binary_data=False)]
    result = http_client.infer("digits", http_inputs(x, binary=True), outputs=outputs, headers=auth(),
                               request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5
    assert (result.as_numpy("label") == logits_of(reference, x).argmax(1)).all()


def test_http_async_infer(http_client: triton_http.InferenceServerClient, reference: torch.nn.Module) -> None:
    xs = [np.ascontiguousarray(digits()[0][i * 4:(i + 1) * 4]) for i in range(6)]
    pending = [http_client.async_infer("digits", http_inputs(x, binary=i % 2 == 0), request_id=str(i),
                                       headers=auth()) for i, x in enumerate(xs)]
    for i, (x, call) in enumerate(zip(xs, pending, strict=True)):
        result = call.get_result(timeout=60)
        assert result.get_response()["id"] == str(i)
        assert np.abs(result.as_numpy("logits") - logits_of(reference, x)).max() <= 1e-5


def test_http_aio_client(door: FrontDoor, reference: torch.nn.Module) -> None:
    async def main() -> np.ndarray:
        async with triton_http_aio.InferenceServerClient(door.http_url.removeprefix("http://")) as c:
            tensor = triton_http_aio.InferInput("input", [2, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(x)
            return (await c.infer("digits", [tensor], headers=auth())).as_numpy("logits")

    x = np.ascontiguousarray(digits()[0][:2])
    assert np.abs(asyncio.run(main()) - logits_of(reference, x)).max() <= 1e-5


def test_http_errors_reach_the_caller(http_client: triton_http.InferenceServerClient) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(InferenceServerException) as caught:
        http_client.infer("digits", http_inputs(x, binary=True))  # no token
    assert caught.value.status() == "401" and "authorization" in caught.value.message()
    bad = triton_http.InferInput("input", [1, 1, 8, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 8, 7), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        http_client.infer("digits", [bad], headers=auth())
    assert caught.value.status() == "400" and "[n, 1, 8, 8]" in caught.value.message()
    assert http_client.infer("digits", http_inputs(x, binary=True), headers=auth()).as_numpy("label").shape == (1,)


def test_encoded_images_as_bytes_over_http_and_grpc(door: FrontDoor, http_client: triton_http.InferenceServerClient,
                                                    client: triton.InferenceServerClient) -> None:
    """Image models also take encoded files, one BYTES element per row: the same answer from tritonclient.http
    (binary), tritonclient.grpc and plain JSON with base64 elements, with class names as BYTES outputs."""
    meta = http_client.get_model_metadata("digits", headers=auth())
    assert any(t["name"] == "image" and t["datatype"] == "BYTES" for t in meta["inputs"]), meta["inputs"]
    from PIL import Image

    def png(pixels: np.ndarray) -> bytes:  # (1, 8, 8) floats in [0, 1]
        out = io.BytesIO()
        Image.fromarray((pixels[0] * 255).round().astype(np.uint8), mode="L").save(out, format="PNG")
        return out.getvalue()

    files = np.array([png(x) for x in digits()[0][:5]], dtype=object)
    http_tensor = triton_http.InferInput("image", [len(files)], "BYTES")
    http_tensor.set_data_from_numpy(files)
    grpc_tensor = triton.InferInput("image", [len(files)], "BYTES")
    grpc_tensor.set_data_from_numpy(files)
    answers = [http_client.infer("digits", [http_tensor], headers=auth()),
               client.infer("digits", [grpc_tensor], headers=HEADERS)]
    labels = [a.as_numpy("label") for a in answers]
    names = [a.as_numpy("class_name") for a in answers]
    body = {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files],
                        "parameters": {"content_type": "base64"}}]}  # JSON carries text: files go as base64
    answer = httpx.post(f"{door.http_url}/v2/models/digits/infer", json=body, headers=auth(), timeout=30)
    outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    labels.append(np.array(outputs["label"]))
    names.append(np.array([n.encode() for n in outputs["class_name"]], dtype=object))
    assert labels[0].shape == (5,) and all((label == labels[0]).all() for label in labels)
    assert names[0].dtype == object and all(type(v) is bytes for v in names[0])
    assert all(list(n) == list(names[0]) for n in names)


def test_outputs_into_the_clients_shared_memory(client: triton.InferenceServerClient,
                                               http_client: triton_http.InferenceServerClient,
                                               reference: torch.nn.Module) -> None:
    """Outputs written where the request asks, as Triton's own shared memory example does it: one region for the
    input and one for the outputs, over gRPC and over HTTP; the answer names each output, its data is in the
    region. An output region too small, or unknown, fails the request and says what to do."""
    import tritonclient.utils.shared_memory as shm

    x = np.ascontiguousarray(digits()[0][:8])
    expected = logits_of(reference, x)
    key = f"/gradserve-test-out-{id(x)}"
    handles = [shm.create_shared_memory_region("in", f"{key}-in", x.nbytes),
               shm.create_shared_memory_region("out", f"{key}-out", 64 + 2 * expected.nbytes)]
    try:
        shm.set_shared_memory_region(handles[0], [x])
        for api, headers, offset in ((triton, HEADERS, 64), (triton_http, auth(), 64 + expected.nbytes)):
            user = client if api is triton else http_client
            user.register_system_shared_memory("in", f"{key}-in", x.nbytes, headers=headers)
            user.register_system_shared_memory("out", f"{key}-out", 64 + 2 * expected.nbytes, headers=headers)
            given = api.InferInput("input", list(x.shape), "FP32")
            given.set_shared_memory("in", x.nbytes)
            logits, label = api.InferRequestedOutput("logits"), api.InferRequestedOutput("label")
            logits.set_shared_memory("out", expected.nbytes, offset=offset)
            result = user.infer("digits", [given], outputs=[label, logits], headers=headers)
            written = result.get_output("logits")
            shape = written.shape if api is triton else written["shape"]
            assert list(shape) == list(expected.shape)
            got = shm.get_contents_as_numpy(handles[1], np.float32, list(shape), offset=offset)
            assert np.abs(got - expected).max() <= 1e-5
            assert list(result.as_numpy("label")) == list(expected.argmax(1))  # the other output, as always

            logits.set_shared_memory("out", expected.nbytes - 4, offset=offset)
            with pytest.raises(InferenceServerException, match=f"more than the {expected.nbytes - 4} its request"):
                user.infer("digits", [given], outputs=[logits], headers=headers)
            logits.set_shared_memory("elsewhere", expected.nbytes)
            with pytest.raises(InferenceServerException, match="no shared memory region 'elsewhere' is registered"):
                user.infer("digits", [given], outputs=[logits], headers=headers)
            user.unregister_system_shared_memory(headers=headers)
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def test_inputs_from_the_clients_shared_memory(client: triton.InferenceServerClient,
                                               http_client: triton_http.InferenceServerClient,
                                               reference: torch.nn.Module) -> None:
    """Triton's system shared memory extension, as its clients use it: a region registered over gRPC and one over
    HTTP, inputs read from them at an offset, the same answers as inline; regions listed, then unregistered."""
    import tritonclient.utils.shared_memory as shm

    x = np.ascontiguousarray(digits()[0][:20])
    key = f"/gradserve-test-{id(x)}"
    handle = shm.create_shared_memory_region("digits-in", key, x.nbytes * 2)
    try:
        shm.set_shared_memory_region(handle, [x[10:], x[:10]])  # the first 10 rows sit after the other 10
        client.register_system_shared_memory("grpc-region", key, x.nbytes, headers=HEADERS)
        http_client.register_system_shared_memory("http-region", key, x.nbytes, headers=auth())
        regions = client.get_system_shared_memory_status(headers=HEADERS).regions
        assert {name: (r.key, r.byte_size) for name, r in regions.items()} == {
            "grpc-region": (key, x.nbytes), "http-region": (key, x.nbytes)}
        assert {r["name"] for r in http_client.get_system_shared_memory_status(headers=auth())} == set(regions)

        first = x[:10]
        grpc_input = triton.InferInput("input", list(first.shape), "FP32")
        grpc_input.set_shared_memory("grpc-region", first.nbytes, offset=x.nbytes - first.nbytes)
        http_input = triton_http.InferInput("input", list(first.shape), "FP32")
        http_input.set_shared_memory("http-region", first.nbytes, offset=x.nbytes - first.nbytes)
        answers = [client.infer("digits", [grpc_input], headers=HEADERS).as_numpy("logits"),
                   http_client.infer("digits", [http_input], headers=auth()).as_numpy("logits")]
        for logits in answers:
            assert np.abs(logits - logits_of(reference, first)).max() <= 1e-5

        grpc_input.set_shared_memory("grpc-region", first.nbytes, offset=x.nbytes)  # past the region's end
        with pytest.raises(InferenceServerException, match="passes the end of region 'grpc-region'"):
            client.infer("digits", [grpc_input], headers=HEADERS)
        with pytest.raises(InferenceServerException, match="Unauthenticated|UNAUTHENTICATED|token"):
            client.register_system_shared_memory("no-token", key, x.nbytes)

        client.unregister_system_shared_memory("grpc-region", headers=HEADERS)
        http_client.unregister_system_shared_memory(headers=auth())  # every region left
        assert not client.get_system_shared_memory_status(headers=HEADERS).regions
        with pytest.raises(InferenceServerException, match="no shared memory region 'http-region' is registered"):
            http_client.infer("digits", [http_input], headers=auth())
    finally:
        shm.destroy_shared_memory_region(handle)
