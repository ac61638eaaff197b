"""The inference request and its answer as they travel over HTTP, and their OpenAPI description.

An inference request is JSON, whatever its content-type or none (tritonclient.http sends none), optionally
gzip- or deflate-compressed (Content-Encoding). With the header `Inference-Header-Content-Length: N` it follows
Triton's binary tensor data extension: the first N bytes of the body are the JSON request, and each input whose
`parameters.binary_data_size` is set takes that many of the bytes after it, in input order, as its raw contents.
Outputs go back as JSON `data`, or, where the request asks (`parameters.binary_data_output`, or an output's
`parameters.binary_data`), as raw contents after the JSON response, whose length the same header gives.
The body is parsed by simdjson, floating-point inputs' numbers straight into arrays (server/fastjson.py), or
where it does not take the body (NaN, ...) by pydantic_core's JSON parser into plain values; checked here and
turned into arrays by numpy (server/oip.py). The pydantic models below only describe it in /openapi.json.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydantic_core import from_json, to_json

from handlers import codec
from handlers.manifest import Manifest
from server import client_shm, fastjson, oip
from server.errors import InvalidInput, MessageTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
SHAPE_OF_A_REQUEST = ('{"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]} '
                      "(the v2 protocol's inference request)")


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description='"binary_data_size": the input\'s raw bytes follow the JSON (binary extension); '
                          '"content_type": "base64": BYTES elements are base64')
    data: list[Any] | None = Field(None, description="the elements, flat or nested, in row-major order "
                                                     "(absent when parameters.binary_data_size is set)")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description='"binary_data": true: return it as raw bytes')


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description='"binary_data_size": its raw bytes follow the JSON')
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputTensor]


_BINARY = {"schema": {"type": "string", "format": "binary"}}
INFER_DOCS: dict[str, Any] = {
    "openapi_extra": {"requestBody": {"required": True, "description": (
        f"an inference request as JSON; or, with the header {HEADER_LENGTH} giving the JSON's length, the JSON "
        "followed by the raw bytes of each input whose parameters.binary_data_size is set, in input order"),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                    "application/octet-stream": _BINARY}}},
    "responses": {200: {"description": f"JSON; or, when binary outputs were asked for, the JSON (its length in "
                                       f"{HEADER_LENGTH}) followed by their raw bytes",
                        "content": {"application/octet-stream": _BINARY}}},
}


def describe_inference_request(app: FastAPI) -> None:
    """/openapi.json describes the infer body with InferenceRequest's schema, although the route reads the body
    itself (FastAPI adds a model to the components only when a route declares it as a parameter)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, cached after the first call
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "InferenceRequest" not in components:
            request = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in request.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["InferenceRequest"] = request
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


@dataclass(frozen=True)
class Inference:
    """An inference request as read off the wire: its inputs, the outputs asked for (all when empty), and
    which outputs go back as binary data."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=list)
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # an output's own parameters.binary_data
    binary_by_default: bool = False  # the request's parameters.binary_data_output
    targets: dict[str, client_shm.Target] = field(default_factory=dict)  # outputs to write to shared memory

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_by_default)


async def body_of(request: Request, limit: int) -> bytes:
    """The request's body, decompressed when it says Content-Encoding gzip or deflate (tritonclient's
    request_compression_algorithm; inflated in a thread), within `limit` bytes either way."""
    body = await request.body()
    encoding = (request.headers.get("content-encoding") or "identity").lower()
    if encoding == "identity":
        return body
    return await asyncio.to_thread(_inflate, body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; send the body plain, gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"the body is not {encoding} data ({e}); send it as its Content-Encoding says") from None
    if len(plain) > limit:
        raise MessageTooLarge(f"the request decompresses to more than {limit} bytes, the limit")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated; send all of it")
    return plain


def read_inference(body: bytes, header_length: str | None, regions: client_shm.Regions | None = None) -> Inference:
    """The inference request in `body`: JSON, or with `header_length` (Inference-Header-Content-Length) that
    many bytes of JSON followed by the inputs' binary data; an input may name a registered shared memory region
    instead (`regions`). InvalidInput says what is malformed."""
    text, binary = _split(body, header_length)
    request = _json_object(text, binary is None)
    parameters = _parameters(request, "the request")
    entries = request.get("inputs")
    if not isinstance(entries, list):  # an empty one is the model's to refuse, naming what it takes
        raise InvalidInput(f"the request has no list of inputs; send {SHAPE_OF_A_REQUEST}")
    inputs: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        name, x, used = _input(i, entry, binary, regions)
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        inputs[name] = x
        binary = binary[used:] if binary is not None else None
    if binary:
        raise InvalidInput(f"the body has {len(binary)} bytes after the JSON request that no input's "
                           "parameters.binary_data_size accounts for; the sizes must add up to the binary data")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"the request's id must be a string, got {request_id!r}")
    outputs, binary_outputs, in_regions = _requested_outputs(request.get("outputs"))
    if in_regions and regions is None:
        raise InvalidInput(f"outputs {sorted(in_regions)}: this server writes no shared memory")
    targets = {name: regions.target(name, asked) for name, asked in in_regions.items()} if regions else {}
    return Inference(request_id, inputs, outputs, binary_outputs,
                     bool(_flag(parameters, "binary_data_output", "the request")), targets)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    """The JSON part of the body and the binary data after it (None: no binary extension)."""
    if header_length is None:
        return body, None
    if not re.fullmatch(r"[0-9]+", header_length.strip()):
        raise InvalidInput(f"{HEADER_LENGTH} must be the byte length of the JSON request at the start of the body, "
                           f"got {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes; it must give the "
                           "length of the JSON request at the start of the body")
    return body[:n], memoryview(body)[n:]


def _json_object(text: bytes, plain: bool) -> dict[str, Any]:
    fast = fastjson.parse(text)  # float tensors straight into arrays; None: the general parser below reads it
    if fast is not None:
        return fast
    try:
        request = from_json(text, cache_strings="keys")
    except ValueError as e:  # also bytes that are not UTF-8, and nesting too deep
        hint = f"; binary tensor data may follow it only with the header {HEADER_LENGTH}" if plain else ""
        raise InvalidInput(f"the JSON request is not valid JSON ({e}); send {SHAPE_OF_A_REQUEST}{hint}") from None
    if not isinstance(request, dict):
        raise InvalidInput(f"the JSON request must be an object; send {SHAPE_OF_A_REQUEST}")
    return request


def _parameters(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: parameters must be an object, got {parameters!r}"[:300])
    return parameters


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameters.{key} must be true or false, got {value!r}"[:300])
    return value


def _input(i: int, entry: Any, binary: memoryview | None, regions: client_shm.Regions | None = None
           ) -> tuple[str, np.ndarray, int]:
    """One input of the request: its name, its tensor, and how many bytes of the binary data it took."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidInput(f"inputs[{i}] must be an object with a string name; send {SHAPE_OF_A_REQUEST}")
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: datatype must be a string such as \"FP32\" or \"BYTES\"")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, got {shape!r}"[:300])
    parameters = _parameters(entry, f"input {name!r}")
    if client_shm.wants_region(parameters):
        if "data" in entry or "binary_data_size" in parameters:
            raise InvalidInput(f"input {name!r}: send a shared memory region, data or binary data, one of them")
        if regions is None:
            raise InvalidInput(f"input {name!r}: this server reads no shared memory")
        return name, oip.from_bytes(name, datatype, shape, regions.read(name, parameters)), 0
    size = parameters.get("binary_data_size")
    if size is None:
        data = entry.get("data")
        if not isinstance(data, list | np.ndarray):  # an array: server/fastjson.py read the numbers
            raise InvalidInput(f"input {name!r}: data must be a list of its elements (flat or nested, row-major), "
                               f"or set parameters.binary_data_size and send them as binary data ({HEADER_LENGTH})")
        base64_strings = parameters.get("content_type") == "base64"
        return name, oip.from_values(name, datatype, shape, data, "data", base64_strings), 0
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name!r}: parameters.binary_data_size must be a byte count, got {size!r}"[:300])
    if "data" in entry:
        raise InvalidInput(f"input {name!r}: send data or parameters.binary_data_size, not both")
    if binary is None:
        raise InvalidInput(f"input {name!r} has parameters.binary_data_size but the request has no {HEADER_LENGTH} "
                           "header; send the JSON's length in it and the binary data after the JSON")
    if size > len(binary):
        raise InvalidInput(f"input {name!r}: parameters.binary_data_size is {size} but only {len(binary)} bytes "
                           "of binary data are left (inputs take theirs in order, after the JSON request)")
    return name, oip.from_bytes(name, datatype, shape, binary[:size]), size


def _requested_outputs(entries: Any) -> tuple[list[str], dict[str, bool], dict[str, dict[str, Any]]]:
    """The outputs asked for, each one's own choice of binary data, and the parameters of those asked into a
    shared memory region."""
    if entries is None:
        return [], {}, {}
    if not isinstance(entries, list):
        raise InvalidInput('outputs must be a list of objects such as {"name": "label"}')
    names, binary, in_regions = [], {}, {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f'outputs[{i}] must be an object with a string name, such as {{"name": "label"}}')
        name = entry["name"]
        parameters = _parameters(entry, f"output {name!r}")
        if "classification" in parameters:
            raise InvalidInput(f"output {name!r}: the classification extension is not supported; ask for the "
                               "output itself (the model's outputs include its label)")
        if client_shm.wants_region(parameters):
            in_regions[name] = parameters
        flag = _flag(parameters, "binary_data", f"output {name!r}")
        if flag is not None:
            binary[name] = flag
        names.append(name)
    return names, binary, in_regions


def inference_response(manifest: Manifest, call: Inference, outputs: Mapping[str, np.ndarray],
                       regions: client_shm.Regions | None = None) -> Response:
    """The outputs as JSON `data`, those asked for as binary data after the JSON (binary extension), and those
    asked into shared memory written there (their entry has no data)."""
    entries, chunks = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": codec.datatype_of(array.dtype), "shape": list(array.shape)}
        if name in call.targets and regions is not None:
            regions.write(call.targets[name], oip.to_raw(array))
        elif call.binary(name):
            raw = oip.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = oip.to_values(name, array)
        entries.append(entry)
    head = to_json({"model_name": manifest.name, "model_version": manifest.version, "id": call.id,
                    "outputs": entries})  # NaN and infinities as JSON's common extension: NaN, Infinity
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *chunks]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})
