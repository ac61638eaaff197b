"""The tensor wire format shared by the front door and the TorchServe handler.

One message carries named tensors as raw little-endian bytes, or one error:

    b"GSv1" | u32 header length (LE) | JSON header | tensor bytes, back to back

The header lists each tensor's name, Open Inference Protocol datatype, shape, offset and byte count,
or holds {"error": {"code": ..., "message": ...}}. Decoding makes no copy: arrays are views on the message.
This file imports only numpy and the standard library, because it ships inside the model archive.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"GSv1"
_LEN = struct.Struct("<I")

# Open Inference Protocol datatype -> little-endian numpy dtype (BYTES is not a tensor type we serve).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

# Error codes carried in payloads; the front door maps them to gRPC and HTTP statuses.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"


class CodecError(ValueError):
    """The bytes are not a message of this format."""


@dataclass(frozen=True)
class WireError:
    code: str
    message: str


@dataclass(frozen=True)
class Message:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    error: WireError | None = None


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype, e.g. float32 -> "FP32"."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise CodecError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise CodecError(f"unsupported datatype {datatype!r}; use one of {sorted(DATATYPES)}") from None


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    entries, chunks, offset = [], [], 0
    for name, array in tensors.items():
        array = np.asarray(array)
        datatype = datatype_of(array.dtype)
        data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).reshape(-1).view(np.uint8)  # no copy
        entries.append(
            {"name": name, "datatype": datatype, "shape": list(array.shape), "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    return _frame({"tensors": entries}, chunks)


def encode_error(code: str, message: str) -> bytes:
    return _frame({"error": {"code": code, "message": message}}, [])


def _frame(header: dict, chunks: list) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LEN.pack(len(head)), head, *chunks])


def decode(data: bytes | bytearray | memoryview) -> Message:
    view = memoryview(data).cast("B")
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise CodecError("payload is not a gradserve tensor message (bad magic); encode it with handlers.codec")
    (head_len,) = _LEN.unpack_from(view, 4)
    body_start = 8 + head_len
    if body_start > len(view):
        raise CodecError("payload is truncated: the header runs past the end")
    try:
        header = json.loads(bytes(view[8:body_start]))
    except ValueError:
        raise CodecError("payload header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CodecError("payload header must be a JSON object")
    if "error" in header:
        err = header["error"]
        return Message(error=WireError(str(err.get("code", INTERNAL)), str(err.get("message", ""))))
    body = view[body_start:]
    tensors: dict[str, np.ndarray] = {}
    for entry in header.get("tensors", []):
        tensors[entry["name"]] = _tensor(body, entry)
    return Message(tensors=tensors)


def _tensor(body: memoryview, entry: dict) -> np.ndarray:
    name = entry.get("name")
    dtype = dtype_of(entry.get("datatype", ""))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    offset, nbytes = int(entry.get("offset", -1)), int(entry.get("nbytes", -1))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise CodecError(f"tensor {name!r}: shape {shape} of {entry['datatype']} needs {expected} bytes, got {nbytes}")
    if offset < 0 or offset + nbytes > len(body):
        raise CodecError(f"tensor {name!r}: its bytes run past the end of the payload")
    return np.frombuffer(body, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
