"""The Open Inference Protocol v2 as both transports speak it: the server's identity, model metadata, and input
tensors decoded from raw bytes (gRPC's raw_input_contents, Triton's binary extension) or from values (gRPC's
typed contents, REST's JSON `data`), with one set of checks and messages. The transports (grpc_servicer.py,
rest.py) only move these between their wire formats.
"""

from __future__ import annotations

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
EXTENSIONS = ("model_stream_infer",)


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    """ModelMetadata as the protocol's JSON; `parameters` (MLServer's extension) carries the selection record."""
    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"name": manifest.name, "versions": [manifest.version], "platform": manifest.platform,
            "inputs": tensors(manifest.inputs), "outputs": tensors(manifest.outputs),
            "parameters": manifest.properties()}


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
    """An input sent as raw little-endian bytes (a zero-copy view on them)."""
    dtype, count = _header(name, datatype, shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} "
                           f"bytes, got {len(raw)}")
    return _shaped(name, datatype, shape, lambda: np.frombuffer(raw, dtype=dtype))


def from_values(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any], where: str) -> np.ndarray:
    """An input sent as values, flat or nested, in row-major order; `where` names the field they came in."""
    dtype, count = _header(name, datatype, shape)
    try:
        flat = np.asarray(values, dtype=dtype).ravel()
    except (ValueError, TypeError, OverflowError):  # OverflowError: e.g. 300 for INT8
        raise InvalidInput(f"input {name!r}: {where} must be numbers of {datatype}, flat or nested, "
                           "in row-major order") from None
    if flat.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} values in {where}, got {flat.size}")
    return _shaped(name, datatype, shape, lambda: flat)
