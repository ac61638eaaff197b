"""The tensor wire format shared by the front door and the TorchServe handler.

One message carries named tensors as raw little-endian bytes, or one error:

    b"GSv1" | u32 header length (LE) | JSON header | tensor bytes, back to back

The header lists each tensor's name, Open Inference Protocol datatype, shape, offset and byte count (and, in a
request, optionally "outputs": the names of the outputs wanted, so the handler computes and returns only those),
or holds {"error": {"code": ..., "message": ...}}, or {"ref": {"path": ..., "nbytes": ...}}: the message itself is
in that file (a large request the front door passed by shared memory, handlers/sharedmem.py). Decoding a numeric
tensor makes no copy: the array is a view on the message. A BYTES tensor (in Python an object array of `bytes`,
e.g. one encoded image file per row) travels in the protocol's own serialisation, which `serialize_bytes` and
`deserialize_bytes` write and read for the front door too: per element a 4-byte little-endian length, then that
many bytes.
This file imports only numpy and the standard library, because it ships inside the model archive.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"GSv1"
_LEN = struct.Struct("<I")

# Open Inference Protocol datatype -> little-endian numpy dtype, for the fixed-size types (BYTES: see BYTES below).
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
BYTES = "BYTES"  # variable-length elements: a numpy object array whose elements are bytes
BYTES_FORMAT = "each element is a 4-byte little-endian length, then that many bytes"

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
class Ref:
    path: str
    nbytes: int


@dataclass(frozen=True)
class Message:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    error: WireError | None = None
    ref: Ref | None = None
    outputs: tuple[str, ...] | None = None  # a request's wanted outputs; None: all of them


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype, e.g. float32 -> "FP32"; object (and numpy's bytes and str) -> BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return BYTES
    try:
        return _NAMES[dtype.newbyteorder("=")]
    except KeyError:
        raise CodecError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype, e.g. "FP32" -> little-endian float32; "BYTES" -> object."""
    if datatype == BYTES:
        return np.dtype(object)
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise CodecError(f"unsupported datatype {datatype!r}; use one of {[*DATATYPES, BYTES]}") from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's elements in row-major order, each as its 4-byte little-endian length then its bytes
    (str elements as UTF-8)."""
    chunks = []
    for i, element in enumerate(np.asarray(array).ravel()):
        if isinstance(element, str):
            element = element.encode()
        elif isinstance(element, bytearray | memoryview):
            element = bytes(element)
        elif not isinstance(element, bytes):
            raise CodecError(f"BYTES element {i} is a {type(element).__name__}; elements must be bytes or str")
        chunks += (_LEN.pack(len(element)), element)
    return b"".join(chunks)


def deserialize_bytes(data: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """The `count` elements of a serialised BYTES tensor as a 1-D object array of bytes, or CodecError when
    `data` is not exactly `count` elements in the protocol's form."""
    view = memoryview(data).cast("B")
    if count * _LEN.size > len(view):  # checked first: a huge shape must not allocate a huge array
        raise CodecError(f"BYTES data of {len(view)} bytes cannot hold {count} elements ({BYTES_FORMAT}, "
                         f"so at least {count * _LEN.size} bytes)")
    out = np.empty(count, dtype=object)
    at = 0
    for i in range(count):
        if at + _LEN.size > len(view):
            raise CodecError(f"BYTES data ends inside the length of element {i} of {count}; {BYTES_FORMAT}")
        (size,) = _LEN.unpack_from(view, at)
        at += _LEN.size
        if at + size > len(view):
            raise CodecError(f"BYTES element {i} of {count} declares {size} bytes but only {len(view) - at} "
                             f"remain; {BYTES_FORMAT}")
        out[i] = bytes(view[at:at + size])
        at += size
    if at != len(view):
        raise CodecError(f"BYTES data has {len(view) - at} bytes left over after its {count} elements; "
                         f"{BYTES_FORMAT}")
    return out


def encode(tensors: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> bytes:
    return b"".join(encode_parts(tensors, outputs))


def encode_parts(tensors: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[bytes | np.ndarray]:
    """The message as buffers to write back to back (the tensors' bytes not copied); `outputs`: a request's
    wanted outputs (None: all)."""
    entries, chunks, offset = [], [], 0
    for name, array in tensors.items():
        array = np.asarray(array)
        datatype = datatype_of(array.dtype)
        if datatype == BYTES:
            data: bytes | np.ndarray = serialize_bytes(array)
        else:
            data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).reshape(-1).view(np.uint8)  # no copy
        entries.append(
            {"name": name, "datatype": datatype, "shape": list(array.shape), "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    header: dict = {"tensors": entries}
    if outputs is not None:
        header["outputs"] = list(outputs)
    return _frame(header, chunks)


def encode_error(code: str, message: str) -> bytes:
    return b"".join(_frame({"error": {"code": code, "message": message}}, []))


def encode_ref(path: str, nbytes: int) -> bytes:
    return b"".join(_frame({"ref": {"path": path, "nbytes": nbytes}}, []))


def _frame(header: dict, chunks: list) -> list:
    head = json.dumps(header, separators=(",", ":")).encode()
    return [MAGIC + _LEN.pack(len(head)) + head, *chunks]


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
        if not isinstance(err, dict):
            raise CodecError("payload error must be a JSON object with code and message")
        return Message(error=WireError(str(err.get("code", INTERNAL)), str(err.get("message", ""))))
    if "ref" in header:
        ref = header["ref"]
        if not (isinstance(ref, dict) and isinstance(ref.get("path"), str) and isinstance(ref.get("nbytes"), int)):
            raise CodecError("payload ref must be a JSON object with a path (string) and nbytes (integer)")
        return Message(ref=Ref(ref["path"], ref["nbytes"]))
    entries = header.get("tensors", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                for e in entries):
        raise CodecError("payload header's tensors must be a list of objects, each with a name")
    outputs = header.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise CodecError("payload header's outputs must be a list of output names")
    body = view[body_start:]
    return Message(tensors={entry["name"]: _tensor(body, entry) for entry in entries},
                   outputs=None if outputs is None else tuple(outputs))


def _tensor(body: memoryview, entry: dict) -> np.ndarray:
    name = entry.get("name")
    datatype = entry.get("datatype", "")
    dtype = dtype_of(datatype)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    offset, nbytes = entry.get("offset", -1), entry.get("nbytes", -1)
    if not isinstance(offset, int) or not isinstance(nbytes, int):
        raise CodecError(f"tensor {name!r}: offset and nbytes must be integers")
    if offset < 0 or nbytes < 0 or offset + nbytes > len(body):
        raise CodecError(f"tensor {name!r}: its bytes run past the end of the payload")
    count = math.prod(shape)
    if datatype == BYTES:
        try:
            return deserialize_bytes(body[offset:offset + nbytes], count).reshape(shape)
        except CodecError as e:
            raise CodecError(f"tensor {name!r}: {e}") from None
    if nbytes != count * dtype.itemsize:
        raise CodecError(f"tensor {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                         f"got {nbytes}")
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
