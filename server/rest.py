"""The Open Inference Protocol v2 over HTTP, on the same event loop and the same backend as gRPC.

Routes: /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../infer,
plus /metrics (Prometheus) and the OpenAPI description at /openapi.json (browsable at /docs).

An inference request is JSON, whatever its content-type or none (tritonclient.http sends none), optionally
gzip- or deflate-compressed (Content-Encoding). With the header `Inference-Header-Content-Length: N` it follows
Triton's binary tensor data extension: the first N bytes of the body are the JSON request, and each input whose
`parameters.binary_data_size` is set takes that many of the bytes after it, in input order, as its raw contents.
Outputs go back as JSON `data`, or, where the request asks (`parameters.binary_data_output`, or an output's
`parameters.binary_data`), as raw contents after the JSON response, whose length the same header gives.
The body is parsed by pydantic_core's JSON parser (several times faster than the json module's) into plain values,
checked here, and turned into arrays by numpy; the pydantic models below only describe it in /openapi.json.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from pydantic_core import from_json, to_json
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handlers import codec
from handlers.manifest import Manifest
from server import auth, metrics, oip
from server.backend import Backend
from server.config import ServeConfig
from server.errors import InvalidInput, MessageTooLarge, Unauthenticated, status_of

INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
PARSE_IN_THREAD_BYTES = 256 * 1024  # a body larger than this parses off the event loop
Endpoint = Callable[..., Awaitable[Response]]
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


def _describe_inference_request(app: FastAPI) -> None:
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


def route(method: str) -> Callable[[Endpoint], Endpoint]:
    """A route observed under `method` (the model is its `model` path parameter), whose exceptions become
    their HTTP status and message from the error table."""
    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def wrapped(*args: Any, **kwargs: Any) -> Response:
            with metrics.observe("rest", method, kwargs.get("model", "")) as obs:
                try:
                    return await endpoint(*args, obs=obs, **kwargs)
                except Exception as e:  # noqa: BLE001 - the error table decides what the caller hears
                    return _error(e, obs)
        # FastAPI reads the parameters off the signature: `obs` is ours, not the caller's.
        signature = inspect.signature(endpoint)
        wrapped.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for name, p in signature.parameters.items() if name != "obs"])
        return wrapped  # type: ignore[return-value]
    return decorate


def create_app(config: ServeConfig, backend: Backend, tokens: auth.Tokens) -> FastAPI:
    app = FastAPI(title="gradserve", version=oip.SERVER_VERSION, docs_url=None, redoc_url=None,
                  description="Open Inference Protocol v2 (KServe v2) in front of TorchServe")

    app.add_middleware(Guard, config=config, tokens=tokens, backend=backend)
    _offline_docs(app)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata()

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = backend.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    @route("ModelMetadata")
    async def model_metadata(model: str, obs: metrics.Observation, version: str = "") -> JSONResponse:
        return JSONResponse(backend.metadata(model, version))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    @route("ModelReady")
    async def model_ready(model: str, obs: metrics.Observation, version: str = "") -> JSONResponse:
        ok = backend.model_ready(model, version)
        if not ok:  # why, for people and probes alike: loading, draining, or a failed version's reason
            return JSONResponse({"name": model, "ready": False, "reason": backend.why_not_ready(model, version)},
                                status_code=503)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{model}/infer", response_model=InferenceResponse, **INFER_DOCS)
    @app.post("/v2/models/{model}/versions/{version}/infer", response_model=InferenceResponse, **INFER_DOCS)
    @route("ModelInfer")
    async def infer(model: str, request: Request, obs: metrics.Observation, version: str = "") -> Response:
        body = await _body(request, config.limits.max_message_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        if len(body) > PARSE_IN_THREAD_BYTES:  # a large body parses in a thread: other clients are not held up
            call = await asyncio.to_thread(read_inference, body, header_length)
        else:
            call = read_inference(body, header_length)
        obs.rows = max((len(x) for x in call.inputs.values() if x.ndim), default=0)
        manifest, outputs = await backend.infer(model, version, call.inputs, call.outputs, _timeout(request))
        return inference_response(manifest, call, outputs)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(InvalidInput(f"the body is not an inference request of the v2 protocol: {exc.errors()[:3]}"))

    _describe_inference_request(app)
    return app


class Guard:
    """Auth on every path but health, and the size limit of a request's body, as plain ASGI middleware
    (FastAPI's @app.middleware wraps every request in extra tasks and streams; this costs nothing).

    The limit of an inference request is what its model can take (backend.body_limit: its rows times a row's
    size in the body's encoding), within the server's max_message_bytes: a body announced larger is refused
    with 413 before it is read, and one that grows larger while read (chunked) as soon as it does."""

    def __init__(self, app: ASGIApp, config: ServeConfig, tokens: auth.Tokens, backend: Backend) -> None:
        self.app = app
        self.config = config
        self.tokens = tokens
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            try:
                if scope["path"] not in auth.OPEN_HTTP_PATHS and not self.tokens.authorized(
                        headers.get("authorization")):
                    raise Unauthenticated(auth.MESSAGE)
                limit = self._limit(scope["path"], headers)
                length = int(headers.get("content-length") or 0)
                if length > limit:
                    raise MessageTooLarge(f"the request has {length} bytes; the limit is {limit} (the most its "
                                          "model's largest request takes, or the server's limit); send fewer rows")
            except Exception as e:  # noqa: BLE001 - answered from the error table
                response = _error(e)
                if isinstance(e, MessageTooLarge):
                    # Close the connection after the answer: reading (and discarding) the rest of a body we refused
                    # would cost the event loop what refusing it early saved.
                    response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
            receive = _limited(receive, limit)
        await self.app(scope, receive, send)

    def _limit(self, path: str, headers: Headers) -> int:
        limit = self.config.limits.max_message_bytes
        match = INFER_PATH.fullmatch(path)
        if match and headers.get("content-encoding") in (None, "identity"):
            model_limit = self.backend.body_limit(match["model"], match["version"] or "",
                                                  binary=headers.get(HEADER_LENGTH) is not None)
            limit = min(limit, model_limit or limit)
        return limit


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive` refusing a body of more than `limit` bytes, however it is sent (a chunked body declares no
    content-length): reading it raises MessageTooLarge, which the route answers with 413."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise MessageTooLarge(f"the request has more than {limit} bytes, the limit")
        return message

    return limited


# --- an inference request and its answer on the wire -----------------------------------------------------------

@dataclass(frozen=True)
class Inference:
    """An inference request as read off the wire: its inputs, the outputs asked for (all when empty), and
    which outputs go back as binary data."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=list)
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # an output's own parameters.binary_data
    binary_by_default: bool = False  # the request's parameters.binary_data_output

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_by_default)


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, decompressed when it says Content-Encoding gzip or deflate (tritonclient's
    request_compression_algorithm), within `limit` bytes either way."""
    body = await request.body()
    encoding = (request.headers.get("content-encoding") or "identity").lower()
    if encoding == "identity":
        return body
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


def read_inference(body: bytes, header_length: str | None) -> Inference:
    """The inference request in `body`: JSON, or with `header_length` (Inference-Header-Content-Length) that
    many bytes of JSON followed by the inputs' binary data. InvalidInput says what is malformed."""
    text, binary = _split(body, header_length)
    request = _json_object(text, binary is None)
    parameters = _parameters(request, "the request")
    entries = request.get("inputs")
    if not isinstance(entries, list):  # an empty one is the model's to refuse, naming what it takes
        raise InvalidInput(f"the request has no list of inputs; send {SHAPE_OF_A_REQUEST}")
    inputs: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        name, x, used = _input(i, entry, binary)
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
    outputs, binary_outputs = _requested_outputs(request.get("outputs"))
    return Inference(request_id, inputs, outputs, binary_outputs,
                     bool(_flag(parameters, "binary_data_output", "the request")))


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


def _input(i: int, entry: Any, binary: memoryview | None) -> tuple[str, np.ndarray, int]:
    """One input of the request: its name, its tensor, and how many bytes of the binary data it took."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidInput(f"inputs[{i}] must be an object with a string name; send {SHAPE_OF_A_REQUEST}")
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: datatype must be a string such as \"FP32\" or \"BYTES\"")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, got {shape!r}"[:300])
    parameters = _parameters(entry, f"input {name!r}")
    size = parameters.get("binary_data_size")
    if size is None:
        data = entry.get("data")
        if not isinstance(data, list):
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


def _requested_outputs(entries: Any) -> tuple[list[str], dict[str, bool]]:
    """The outputs asked for, and each one's own choice of binary data."""
    if entries is None:
        return [], {}
    if not isinstance(entries, list):
        raise InvalidInput('outputs must be a list of objects such as {"name": "label"}')
    names, binary = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f'outputs[{i}] must be an object with a string name, such as {{"name": "label"}}')
        name = entry["name"]
        parameters = _parameters(entry, f"output {name!r}")
        if "classification" in parameters:
            raise InvalidInput(f"output {name!r}: the classification extension is not supported; ask for the "
                               "output itself (the model's outputs include its label)")
        flag = _flag(parameters, "binary_data", f"output {name!r}")
        if flag is not None:
            binary[name] = flag
        names.append(name)
    return names, binary


def inference_response(manifest: Manifest, call: Inference, outputs: Mapping[str, np.ndarray]) -> Response:
    """The outputs as JSON `data`, and those asked for as binary data after the JSON (binary extension)."""
    entries, chunks = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": codec.datatype_of(array.dtype), "shape": list(array.shape)}
        if call.binary(name):
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


# --- helpers ------------------------------------------------------------------------------------------------------

def _timeout(request: Request) -> float | None:
    """A deadline the caller sent as `timeout` in seconds, in the Timeout header or the grpc-style header."""
    value = request.headers.get("timeout") or request.query_params.get("timeout")
    try:
        return float(value) if value else None
    except ValueError:
        raise InvalidInput(f"timeout must be a number of seconds, got {value!r}") from None


def _error(error: Exception, obs: metrics.Observation | None = None) -> JSONResponse:
    status, message = status_of(error)
    if obs is not None:
        obs.status = status.grpc.name  # one status vocabulary for both protocols
    return JSONResponse({"error": message}, status_code=status.http)


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's script and styles served from here (the pinned swagger-ui-bundle-v2 package):
    a public CDN is out of reach in an air-gapped cluster, and the page would stay blank."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="gradserve: API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")
