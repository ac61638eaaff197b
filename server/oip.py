"""The Open Inference Protocol v2 as both transports speak it: the server's identity, model metadata, and input
tensors decoded from raw bytes (gRPC's raw_input_contents, Triton's binary extension) or from values (gRPC's
typed contents, REST's JSON `data`), with one set of checks and messages, and output tensors encoded as raw
contents or JSON values. A BYTES tensor is a numpy object array of `bytes`; its raw form is the protocol's
length-prefixed serialisation (handlers/codec.py). The transports (grpc_servicer.py, rest.py) only move these
between their wire formats.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import gradserve
from handlers import codec
from handlers.manifest import Manifest
from server.errors import InvalidInput

SERVER_NAME = "gradserve"
SERVER_VERSION = gradserve.__version__
EXTENSIONS = ("model_stream_infer", "binary_tensor_data", "system_shared_memory")


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, manifest: Manifest | None, versions: Sequence[str],
                   extra: dict[str, str | int | float | bool] | None = None) -> dict[str, Any]:
    """ModelMetadata as the protocol's JSON: the model's versions, and the inputs and outputs of the version asked
    for (none when its archive cannot be read); `parameters` (MLServer's extension) carries the selection record
    and `extra` (the versions' states)."""
    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"name": name, "versions": list(versions),
            "platform": manifest.platform if manifest else "pytorch_torchserve",
            "inputs": tensors(manifest.inputs) if manifest else [],
            "outputs": tensors(manifest.outputs) if manifest else [],
            "parameters": {**(manifest.properties() if manifest else {}), **(extra or {})}}


def _header(name: str, datatype: str, shape: Sequence[int]) -> tuple[np.dtype, int]:
    """The numpy dtype and element count of an input's header, or InvalidInput."""
    try:
        dtype = codec.dtype_of(datatype)
    except codec.CodecError as e:
        raise InvalidInput(f"input {name!r}: {e}") from None
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return dtype, math.prod(shape)  # Python ints: a product of huge dimensions must not wrap around to a small one


def _shaped(name: str, datatype: str, shape: Sequence[int], flat: Callable[[], np.ndarray]) -> np.ndarray:
    """numpy's refusals (a value out of the datatype's range, an empty tensor with dimensions too large to
    address) are the caller's mistake, not ours."""
    try:
        return flat().reshape(tuple(shape))
    except (OverflowError, ValueError, TypeError) as e:
        raise InvalidInput(f"input {name!r}: not a {datatype} tensor of shape {list(shape)}: {e}") from None


def from_bytes(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """An input sent as raw little-endian bytes (a zero-copy view on them), or for BYTES in the protocol's
    serialisation (each element a 4-byte little-endian length, then its bytes)."""
    dtype, count = _header(name, datatype, shape)
    if datatype == codec.BYTES:
        try:
            flat = codec.deserialize_bytes(raw, count)
        except codec.CodecError as e:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} BYTES elements: {e}") from None
        return _shaped(name, datatype, shape, lambda: flat)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} "
                           f"bytes, got {len(raw)}")
    return _shaped(name, datatype, shape, lambda: np.frombuffer(raw, dtype=dtype))


def from_values(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any] | np.ndarray, where: str,
                base64_strings: bool = False) -> np.ndarray:
    """An input sent as values, flat or nested, in row-major order; `where` names the field they came in.
    BYTES values are bytes or str (UTF-8); with `base64_strings` each is base64 that decodes to the element."""
    dtype, count = _header(name, datatype, shape)
    if datatype == codec.BYTES:
        flat = _bytes_elements(name, values, where, base64_strings)
    else:
        try:
            flat = np.asarray(values, dtype=dtype).ravel()
        except (ValueError, TypeError, OverflowError):  # OverflowError: e.g. 300 for INT8
            raise InvalidInput(f"input {name!r}: {where} must be numbers of {datatype}, flat or nested, "
                               "in row-major order") from None
    if flat.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} values in {where}, got {flat.size}")
    return _shaped(name, datatype, shape, lambda: flat)


_END = object()  # the end of a nested list, for _bytes_elements


def _bytes_elements(name: str, values: Sequence[Any], where: str, base64_strings: bool) -> np.ndarray:
    """A BYTES input's values, flattened in row-major order, as a 1-D object array of bytes."""
    flat: list[bytes] = []
    pending = [iter(values)]
    while pending:  # depth-first without recursion: nesting depth is the caller's to choose
        element = next(pending[-1], _END)
        if element is _END:
            pending.pop()
        elif isinstance(element, list | tuple):
            pending.append(iter(element))
        elif isinstance(element, str | bytes):
            flat.append(_element(name, len(flat), element, base64_strings))
        else:
            raise InvalidInput(f"input {name!r}: {where} element {len(flat)} is a {type(element).__name__}; "
                               "BYTES values are strings (UTF-8, or base64 with parameters.content_type "
                               "\"base64\"), flat or nested, in row-major order")
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out


def _element(name: str, index: int, value: str | bytes, base64_strings: bool) -> bytes:
    if not base64_strings:
        return value.encode() if isinstance(value, str) else value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: a str with characters outside ASCII
        raise InvalidInput(f"input {name!r}: element {index} is not valid base64 ({e}); send each element "
                           "base64-encoded, or drop parameters.content_type to send it as text") from None


def to_raw(array: np.ndarray) -> bytes:
    """An output as the protocol's raw contents: little-endian bytes, or for BYTES the length-prefixed form."""
    if codec.datatype_of(array.dtype) == codec.BYTES:
        return codec.serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_values(name: str, array: np.ndarray) -> list[Any]:
    """An output as JSON values in row-major order; BYTES elements as UTF-8 strings."""
    if codec.datatype_of(array.dtype) != codec.BYTES:
        return array.ravel().tolist()
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot carry; ask for "
                           "it as binary data (the output's parameters.binary_data: true) or over gRPC") from None
