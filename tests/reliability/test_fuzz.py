"""Bad input, generated: ModelInfer over gRPC fuzzed with hypothesis (shapes, datatypes, raw sizes, typed
contents, empty and oversized messages, NaN/Inf, unknown names, versions and outputs), and the REST API
fuzzed from its own OpenAPI description with schemathesis. Every answer carries the status the request
deserves (never INTERNAL, never a 5xx); the server is healthy afterwards and logged no unhandled error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from frontdoor_fixtures import TOKEN, FrontDoor, digits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from client.grpc_client import decode, request
from handlers import codec
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc
from server.grpc_servicer import CONTENTS_FIELD

from .conftest import MAX_MESSAGE, scaled

AUTH = (("authorization", f"Bearer {TOKEN}"),)
EXAMPLES = int(scaled(150, 3000))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not scaled(0, 1),
                suppress_health_check=list(HealthCheck))
DATATYPES = [*codec.DATATYPES, "BYTES", "FP8", "fp32", ""]
ROW_SHAPE = (1, 8, 8)
FIELD_RANGES = {"int_contents": (-(2**31), 2**31 - 1), "uint_contents": (0, 2**32 - 1),
                "int64_contents": (-(2**63), 2**63 - 1), "uint64_contents": (0, 2**64 - 1)}

pytestmark = pytest.mark.slow


@st.composite
def shapes(draw: st.DrawFn) -> list[int]:
    """Mostly [n, 1, 8, 8]; sometimes anything, up to dimensions whose product overflows 64 bits."""
    if draw(st.sampled_from(range(4))) != 3:
        return [draw(st.sampled_from([1, 2, 7, 1024, 0, 1025])), *ROW_SHAPE]
    dims = st.one_of(st.integers(-2, 10), st.sampled_from([2**31, 2**32, 2**62]))
    return draw(st.lists(dims, max_size=5))


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, set[str]]:
    """A ModelInferRequest and the statuses it may be answered with ({"OK"} exactly when it is valid)."""
    model = draw(st.sampled_from(["digits"] * 6 + ["nope", ""]))
    version = draw(st.sampled_from(["", "", "1.0", "1.0", "9"]))
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=draw(st.text(max_size=8)))
    allowed = {"NOT_FOUND"} if model != "digits" or version not in ("", "1.0") else set()
    invalid = False
    outputs = draw(st.lists(st.sampled_from(["logits", "label", "probabilities", "embedding"]), max_size=1))
    message.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs)
    invalid |= "embedding" in outputs

    raw_mode = draw(st.booleans())
    count = draw(st.sampled_from([1] * 8 + [0, 2]))
    invalid |= count != 1
    for _ in range(count):
        name = draw(st.sampled_from(["input"] * 8 + ["pixels", ""]))
        datatype = draw(st.sampled_from(["FP32"] * 16 + DATATYPES))
        shape = draw(shapes())
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        invalid |= name != "input" or datatype != "FP32" or len(shape) != 4 or tuple(shape[1:]) != ROW_SHAPE
        invalid |= not (len(shape) == 4 and 1 <= shape[0] <= 1024)
        elements = int(np.prod(shape, dtype=object)) if shape and min(shape) >= 0 else 0
        dtype = codec.DATATYPES.get(datatype, np.dtype("<f4"))
        if elements > 1024 * 64 or min(shape, default=0) < 0:
            elements = 4  # never materialise a huge tensor: send a few values, which cannot be enough
            invalid = True
        values = np.asarray(draw(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=1)) * elements,
                            np.float64)
        if elements and draw(st.sampled_from(range(8))) == 7:
            values[draw(st.integers(0, elements - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            invalid |= dtype.kind == "f"
        off_by = draw(st.sampled_from([0] * 8 + [-1, 1]))
        invalid |= off_by != 0
        if raw_mode:
            data = np.nan_to_num(values) if dtype.kind != "f" else values
            with np.errstate(invalid="ignore", over="ignore"):
                raw = data.astype(dtype).tobytes()
            message.raw_input_contents.append(raw[:max(0, len(raw) + off_by)] + b"\0" * max(0, off_by))
        else:
            field = CONTENTS_FIELD.get(datatype, "fp32_contents")
            if field in ("fp32_contents", "fp64_contents"):
                typed = values.tolist()
            elif field == "bool_contents":
                typed = [bool(v) for v in np.nan_to_num(values)]
            elif field == "bytes_contents":  # BYTES: encoded files, which the digits model does not take
                typed = [b"\x89PNG"] * elements
            else:  # integer fields: any value of the field's width, in range for the declared type or not
                low, high = FIELD_RANGES[field]
                typed = [draw(st.integers(low, high)) for _ in range(min(elements, 3))] * (elements // 3 + 1)
                typed = typed[:elements]
            typed = typed[:max(0, len(typed) + off_by)] + typed[:max(0, off_by)]
            getattr(tensor.contents, field).extend(typed)
    if raw_mode and count and draw(st.sampled_from(range(10))) == 9:
        message.raw_input_contents.append(b"\0" * 4)  # one more raw entry than inputs
        invalid = True
    if draw(st.sampled_from(range(20))) == 19:
        message.raw_input_contents.append(b"\0" * (MAX_MESSAGE + 1024))  # oversized
        return message, {"RESOURCE_EXHAUSTED"}
    if message.ByteSize() > MAX_MESSAGE:  # grpc refuses it before any field is read (the error table's 413 row)
        return message, {"RESOURCE_EXHAUSTED"}
    if invalid:
        allowed.add("INVALID_ARGUMENT")
    return message, allowed or {"OK"}


def assert_healthy(door: FrontDoor, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    x = np.ascontiguousarray(digits()[0][:2])
    assert len(decode(stub.ModelInfer(request("digits", x), timeout=30, metadata=AUTH))["label"]) == 2
    assert "unhandled error" not in door.log_path.read_text(errors="replace"), "the front door logged a bug"


def test_model_infer_fuzzed(door: FrontDoor, record: Callable[[str, dict[str, Any]], None]) -> None:
    seen: dict[str, int] = {}
    wrong: list[str] = []
    with grpc.insecure_channel(door.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        @FUZZ
        @given(infer_requests())
        def check(case: tuple[pb.ModelInferRequest, set[str]]) -> None:
            message, allowed = case
            try:
                response = stub.ModelInfer(message, timeout=30, metadata=AUTH)
                code, details = "OK", ""
                rows = message.inputs[0].shape[0]
                assert all(o.shape[0] == rows for o in response.outputs)
            except grpc.RpcError as e:
                code, details = e.code().name, e.details()
                assert details, "an error must say what went wrong"
            seen[code] = seen.get(code, 0) + 1
            if code not in allowed:
                wrong.append(f"{code} for a request allowed {allowed}: {details}")
            assert code in allowed, f"{code} ({details}); allowed {allowed}:\n{message}"[:2000]

        check()
        assert_healthy(door, stub)
    record("fuzz_grpc", {"requests": sum(seen.values()), "ok": seen.get("OK", 0),
                         "failed_as_expected": {k: v for k, v in seen.items() if k != "OK"},
                         "lost": len(wrong)})


def test_rest_api_fuzzed_from_its_openapi_description(door: FrontDoor,
                                                     record: Callable[[str, dict[str, Any]], None]) -> None:
    """Every operation of /openapi.json, with bodies and parameters that fit the description (positive) and
    ones that break it (negative): no answer is a 5xx."""
    schema = schemathesis.openapi.from_url(f"{door.http_url}/openapi.json", headers=door.headers)  # docs: token
    operations = [result.ok() for result in schema.get_all_operations()]
    cases = st.one_of([op.as_strategy(mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    statuses: dict[int, int] = {}
    server_errors: list[str] = []

    @settings(FUZZ, max_examples=int(scaled(200, 4000)))
    @given(cases)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=door.http_url, headers=door.headers, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
        assert response.status_code < 500, server_errors[-1]

    check()
    with grpc.insecure_channel(door.grpc_target) as channel:
        assert_healthy(door, pb_grpc.GRPCInferenceServiceStub(channel))
    assert httpx.get(f"{door.http_url}/v2/health/ready").status_code == 200
    record("fuzz_rest", {"operations": len(operations), "requests": sum(statuses.values()),
                         "ok": sum(n for code, n in statuses.items() if code < 300),
                         "failed_as_expected": {f"HTTP {c}": n for c, n in sorted(statuses.items()) if c >= 300},
                         "lost": len(server_errors)})


def test_rest_values_the_datatype_cannot_hold_are_invalid(door: FrontDoor) -> None:
    """Found by fuzzing the gRPC side; the REST side decodes the same way (each was a 500 before)."""
    cases = [("INT8", [2], [300, 1]), ("UINT8", [1], [-1]), ("FP32", [2**32, 2**32, 0], []),
             ("FP32", [2**62, 0], [])]
    for datatype, shape, data in cases:
        body = {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
        answer = httpx.post(f"{door.http_url}/v2/models/digits/infer", json=body, headers=door.headers, timeout=30)
        assert answer.status_code == 400, (datatype, shape, answer.text)
    for timeout in ("nan", "inf", "-1", "0"):
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        answer = httpx.post(f"{door.http_url}/v2/models/digits/infer", json=body,
                            headers={**door.headers, "timeout": timeout}, timeout=30)
        assert answer.status_code in (200, 400, 504), (timeout, answer.text)
