"""The tensor wire format between the front door and the handler (handlers/codec.py): every datatype survives
a round trip, numeric tensors decode as views on the message, BYTES tensors travel in the protocol's
length-prefixed form, and malformed messages are refused with CodecError."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from handlers import codec


def frame(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return codec.MAGIC + struct.pack("<I", len(head)) + head + body


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.mark.parametrize("datatype", sorted(codec.DATATYPES))
def test_every_numeric_datatype_round_trips_as_a_view(datatype: str) -> None:
    dtype = codec.DATATYPES[datatype]
    x = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    message = codec.encode({"x": x, "empty": np.zeros((0, 3), dtype)})
    out = codec.decode(message).tensors
    assert codec.datatype_of(out["x"].dtype) == datatype and out["x"].shape == (2, 3, 4)
    np.testing.assert_array_equal(out["x"], x)
    assert out["empty"].shape == (0, 3)
    assert not out["x"].flags.owndata  # a view on the message: no copy


def test_bytes_datatype_names() -> None:
    assert codec.datatype_of(np.dtype(object)) == "BYTES"
    assert codec.dtype_of("BYTES") == np.dtype(object)
    assert codec.datatype_of(np.array([b"ab"]).dtype) == "BYTES"  # numpy's fixed-width bytes too
    with pytest.raises(codec.CodecError, match="BYTES"):  # the refusal names what is supported
        codec.dtype_of("STRING")


@pytest.mark.parametrize("elements", [
    [b"\x89PNG\r\n\x1a\n\x00\x00", b"", b"x"],  # an empty element among others
    ["naïve", "数字", "😀"],  # str: sent as UTF-8
    [bytes([i % 256]) * (i % 50) for i in range(1000)],  # many elements
    [],
])
def test_bytes_round_trip(elements: list) -> None:
    x = np.empty(len(elements), dtype=object)
    x[:] = elements
    out = codec.decode(codec.encode({"image": x, "label": np.arange(len(elements))})).tensors
    expected = [e.encode() if isinstance(e, str) else e for e in elements]
    assert out["image"].dtype == object and out["image"].shape == (len(elements),)
    assert all(type(v) is bytes for v in out["image"]) and list(out["image"]) == expected
    np.testing.assert_array_equal(out["label"], np.arange(len(elements)))


def test_bytes_keep_their_shape_and_use_the_protocols_serialisation() -> None:
    x = np.array([[b"a", b"bc"], [b"", b"def"]], dtype=object)
    out = codec.decode(codec.encode({"x": x})).tensors["x"]
    assert out.shape == (2, 2) and out.tolist() == x.tolist()
    assert codec.serialize_bytes(x) == prefixed(b"a", b"bc", b"", b"def")
    assert codec.deserialize_bytes(prefixed(b"a", b"bc", b"", b"def"), 4).tolist() == [b"a", b"bc", b"", b"def"]


def test_elements_that_are_not_bytes_are_refused() -> None:
    with pytest.raises(codec.CodecError, match="element 1 is a int"):
        codec.encode({"x": np.array([b"a", 3], dtype=object)})


@pytest.mark.parametrize(("body", "count", "words"), [
    (b"\x05\x00", 1, "cannot hold 1 elements"),  # too short for even one length
    (prefixed(b"ab") + b"\x03\x00", 2, "ends inside the length of element 1"),
    (struct.pack("<I", 10) + b"abc", 1, "declares 10 bytes but only 3 remain"),
    (prefixed(b"ab", b"c"), 1, "5 bytes left over after its 1 elements"),
    (prefixed(b"ab"), 2**62, "cannot hold"),  # a huge shape is refused before anything is allocated
])
def test_malformed_bytes_data_is_refused(body: bytes, count: int, words: str) -> None:
    with pytest.raises(codec.CodecError, match=words) as caught:
        codec.deserialize_bytes(body, count)
    assert "4-byte little-endian length" in str(caught.value)  # the message says what the form is


@pytest.mark.parametrize(("entry", "body", "words"), [
    ({"shape": [2]}, prefixed(b"abcd") + b"\x01\x00", "ends inside the length of element 1"),
    ({"shape": [1]}, prefixed(b"a", b"b"), "left over"),
    ({"shape": [1]}, struct.pack("<I", 99) + b"a", "declares 99 bytes"),
])
def test_malformed_bytes_tensors_in_a_message_are_refused(entry: dict, body: bytes, words: str) -> None:
    header = {"tensors": [{"name": "image", "datatype": "BYTES", "offset": 0, "nbytes": len(body), **entry}]}
    with pytest.raises(codec.CodecError, match=f"tensor 'image': .*{words}"):
        codec.decode(frame(header, body))


@pytest.mark.parametrize(("message", "words"), [
    (b"nope", "bad magic"),
    (codec.MAGIC + struct.pack("<I", 99) + b"{}", "header runs past the end"),
    (frame({"tensors": [{"name": "x", "datatype": "FP32", "shape": [2], "offset": 0, "nbytes": 4}]}, b"\0" * 4),
     "needs 8 bytes, got 4"),
    (frame({"tensors": [{"name": "x", "datatype": "BYTES", "shape": [1], "offset": 0, "nbytes": 9}]},
           prefixed(b"a")), "run past the end"),
    (frame({"tensors": [{"name": "x", "datatype": "STRING", "shape": [1], "offset": 0, "nbytes": 1}]}, b"a"),
     "unsupported datatype"),
])
def test_malformed_messages_are_refused(message: bytes, words: str) -> None:
    with pytest.raises(codec.CodecError, match=words):
        codec.decode(message)


def test_parts_join_to_the_message_and_refs_round_trip() -> None:
    tensors = {"input": np.arange(12, dtype=np.float32).reshape(3, 4), "image": np.array([b"a", b"bc"], dtype=object)}
    assert b"".join(codec.encode_parts(tensors)) == codec.encode(tensors)
    assert codec.decode(codec.encode_ref("/dev/shm/gradserve-payloads-1-x/0", 96)).ref == codec.Ref(
        "/dev/shm/gradserve-payloads-1-x/0", 96)


def test_a_request_names_the_outputs_it_wants() -> None:
    x = {"input": np.zeros((2, 3), dtype=np.float32)}
    assert codec.decode(codec.encode(x)).outputs is None  # all of them
    assert codec.decode(codec.encode(x, ["label", "logits"])).outputs == ("label", "logits")
    assert b"".join(codec.encode_parts(x, [])) == codec.encode(x, [])


def test_errors_round_trip() -> None:
    error = codec.decode(codec.encode_error(codec.INVALID_ARGUMENT, "bad row")).error
    assert error == codec.WireError(codec.INVALID_ARGUMENT, "bad row")


@pytest.mark.parametrize("header", [
    {"tensors": "input"}, {"tensors": [["input"]]}, {"tensors": [{"datatype": "FP32"}]},
    {"tensors": [{"name": "x", "datatype": "FP32", "shape": [1], "offset": "0", "nbytes": 4}]},
    {"tensors": [{"name": "x", "datatype": "FP99", "shape": [1], "offset": 0, "nbytes": 4}]},
    {"error": "boom"}, {"ref": "/dev/shm/x"}, {"ref": {"path": "/dev/shm/x", "nbytes": "9"}}, {"ref": {"nbytes": 9}},
    {"tensors": [], "outputs": "label"}, {"tensors": [], "outputs": [1]},
])
def test_a_malformed_header_is_a_codec_error(header: dict) -> None:
    head = json.dumps(header).encode()
    with pytest.raises(codec.CodecError):
        codec.decode(codec.MAGIC + struct.pack("<I", len(head)) + head + b"\0" * 4)
