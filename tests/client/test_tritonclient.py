"""An unmodified Open Inference Protocol client (tritonclient.grpc) against the real front door subprocess.

Imports no gradserve protobuf stubs (see conftest.py); run with `pytest tests/client`.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
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
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    assert {t.name for t in meta.outputs} == {"logits", "label", "probabilities"}
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
