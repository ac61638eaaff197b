"""server/fastjson.py: the simdjson reading of an inference request gives what the general parser gives, or
leaves the body to it."""

from __future__ import annotations

import json
import threading
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import fastjson, rest_wire
from server.errors import InvalidInput


def general(body: bytes) -> rest_wire.Inference:
    """read_inference as it is without the simdjson path."""
    with mock.patch.object(fastjson, "parse", return_value=None):
        return rest_wire.read_inference(body, None)


def assert_same(body: bytes) -> rest_wire.Inference:
    fast, slow = rest_wire.read_inference(body, None), general(body)
    assert fast.inputs.keys() == slow.inputs.keys()
    for name, x in fast.inputs.items():
        assert x.dtype == slow.inputs[name].dtype and x.shape == slow.inputs[name].shape
        assert np.array_equal(x, slow.inputs[name], equal_nan=x.dtype.kind == "f"), name
    assert (fast.id, fast.outputs, fast.binary_outputs, fast.binary_by_default) == (
        slow.id, slow.outputs, slow.binary_outputs, slow.binary_by_default)
    return fast


def body(*inputs: dict[str, Any], **rest: Any) -> bytes:
    return json.dumps({**rest, "inputs": list(inputs)}).encode()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float_inputs_are_read_into_arrays_and_equal_the_general_parser() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    flat = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    nested = {**flat, "data": x.tolist()}
    for each in (flat, nested):
        assert fastjson.parse(body(each))["inputs"][0]["data"].dtype == np.float64  # numbers, not Python floats
        assert np.array_equal(assert_same(body(each)).inputs["input"], x)
    ints_and_exponents = (b'{"inputs": [{"name": "a", "datatype": "FP64", "shape": [5], '
                          b'"data": [1, -0.0, 2.5E3, 1e-7, 12345678901234567890]}]}')
    assert_same(ints_and_exponents)
    half = {"name": "h", "datatype": "FP16", "shape": [3], "data": [0.1, 65504.0, 1e6]}  # the last overflows to inf
    assert np.isinf(assert_same(body(half)).inputs["h"][2])
    null = {"name": "input", "datatype": "FP32", "shape": [2], "data": [1, None]}  # NaN for both, refused later
    assert np.isnan(assert_same(body(null)).inputs["input"][1])


def test_everything_else_in_the_request_is_read_as_before() -> None:
    request = body({"name": "input", "datatype": "FP32", "shape": [2], "data": [1, 2], "parameters": {"x": [1, {}]}},
                   {"name": "ids", "datatype": "INT64", "shape": [2], "data": [2**62, -3]},
                   {"name": "mask", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                   {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", "b"]},
                   id="r-1", parameters={"binary_data_output": True},
                   outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "logits"}])
    call = assert_same(request)
    assert call.inputs["ids"][0] == 2**62  # integers are not routed through float64
    assert call.inputs["text"].tolist() == ["héllo".encode(), b"b"]
    assert (call.id, call.outputs, call.binary("label"), call.binary("logits")) == ("r-1", ["label", "logits"], False,
                                                                                     True)


@pytest.mark.parametrize("text", [
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [NaN, Infinity]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1],}]}',
    b'["inputs"]',
    b"\xff\xfe not utf-8",
    b"[" * 5000,
    b'{"\\u0000": null, "inputs": []}',  # a key with a NUL character: simdjson's lookup cannot find it
])
def test_what_simdjson_does_not_take_goes_to_the_general_parser(text: bytes) -> None:
    assert fastjson.parse(text) is None
    try:
        expected: Any = general(text)
    except InvalidInput as e:
        expected = str(e)
    try:
        got: Any = rest_wire.read_inference(text, None)
    except InvalidInput as e:
        got = str(e)
    if isinstance(expected, str):
        assert got == expected
    else:  # NaN and Infinity, JSON's common extension, are read as the general parser reads them
        assert got.inputs.keys() == expected.inputs.keys()
        assert all(np.array_equal(got.inputs[k], expected.inputs[k], equal_nan=True) for k in got.inputs)
    good = body({"name": "input", "datatype": "FP32", "shape": [1], "data": [3]})
    assert fastjson.parse(good) is not None  # the parser kept for small texts is still usable


@pytest.mark.parametrize("data, words", [
    ([1, "a"], "data must be numbers of FP32"),
    ([1, [2, "b"]], "data must be numbers of FP32"),
    ([1, 2, 3], "needs 2 values in data, got 3"),
    (7, "data must be a list"),
])
def test_data_that_is_not_numbers_gets_the_same_error(data: Any, words: str) -> None:
    text = body({"name": "input", "datatype": "FP32", "shape": [2], "data": data})
    with pytest.raises(InvalidInput, match=words):
        rest_wire.read_inference(text, None)
    with pytest.raises(InvalidInput, match=words):
        general(text)


def test_nested_data_is_flattened_in_row_major_order_whatever_its_nesting() -> None:
    """A leniency of the simdjson path: ragged nesting, which numpy refuses, is read when the count fits."""
    text = body({"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2, 3], [4]]})
    assert rest_wire.read_inference(text, None).inputs["input"].tolist() == [[1, 2], [3, 4]]


def test_texts_bigger_than_the_kept_parser_and_concurrent_calls() -> None:
    x = np.arange(6, dtype=np.float32)
    small = body({"name": "input", "datatype": "FP32", "shape": [6], "data": x.tolist()})
    with mock.patch.object(fastjson, "SHARED_PARSER_BYTES", 10):  # every text is "big": a parser of its own
        assert np.array_equal(rest_wire.read_inference(small, None).inputs["input"], x)
    answers, failures = [], []

    def read(i: int) -> None:
        y = np.full(1000, i, dtype=np.float32)
        for _ in range(50):
            got = fastjson.parse(body({"name": "input", "datatype": "FP32", "shape": [1000], "data": y.tolist()}))
            if got is None or not np.array_equal(got["inputs"][0]["data"], y):
                failures.append(i)
        answers.append(i)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [0, 1, 2, 3] and not failures


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=3, max_size=3),
                min_size=1, max_size=8), st.booleans())
def test_any_float_rows_read_as_the_general_parser_reads_them(rows: list[list[float]], nested: bool) -> None:
    x = np.array(rows, dtype=np.float32)
    data = x.tolist() if nested else x.ravel().tolist()
    assert_same(body({"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": data}))
