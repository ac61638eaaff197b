"""The Open Inference Protocol v2 over HTTP/JSON, on the same event loop and the same backend as gRPC.

Routes: /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../infer,
plus /metrics (Prometheus) and the OpenAPI description at /openapi.json (browsable at /docs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from handlers import codec
from server import auth, metrics
from server.backend import Backend
from server.config import ServeConfig
from server.errors import InvalidInput, MessageTooLarge, Unauthenticated, status_of
from server.grpc_servicer import EXTENSIONS, SERVER_NAME, SERVER_VERSION
from server.models import ModelInfo

OPEN_PATHS = (*auth.OPEN_HTTP_PATHS, "/docs", "/openapi.json")


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="the elements, flat or nested, in row-major order")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputTensor]


def create_app(config: ServeConfig, backend: Backend) -> FastAPI:
    app = FastAPI(title="gradserve", version=SERVER_VERSION,
                  description="Open Inference Protocol v2 (KServe v2) in front of TorchServe")

    app.add_middleware(Guard, config=config)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = backend.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = "") -> JSONResponse:
        with metrics.observe("rest", "ModelMetadata", model) as obs:
            try:
                return JSONResponse(_metadata(backend.model(model, version)))
            except Exception as e:
                return _error(e, obs)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "") -> JSONResponse:
        with metrics.observe("rest", "ModelReady", model) as obs:
            try:
                ok = backend.model_ready(model, version)
                return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)
            except Exception as e:
                return _error(e, obs)

    @app.post("/v2/models/{model}/infer", response_model=InferenceResponse)
    @app.post("/v2/models/{model}/versions/{version}/infer", response_model=InferenceResponse)
    async def infer(model: str, body: InferenceRequest, request: Request, version: str = "") -> JSONResponse:
        with metrics.observe("rest", "ModelInfer", model) as obs:
            try:
                inputs = {t.name: _array(t) for t in body.inputs}
                if len(inputs) != len(body.inputs):
                    raise InvalidInput("an input name is given twice")
                obs.rows = max((len(x) for x in inputs.values() if x.ndim), default=0)
                requested = [o.name for o in body.outputs or ()]
                info, outputs = await backend.infer(model, version, inputs, requested, _timeout(request))
                return JSONResponse({
                    "model_name": info.name, "model_version": info.version, "id": body.id,
                    "outputs": [{"name": k, "datatype": codec.datatype_of(v.dtype), "shape": list(v.shape),
                                 "data": v.ravel().tolist()} for k, v in outputs.items()]})
            except Exception as e:
                return _error(e, obs)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(InvalidInput(f"the body is not an inference request of the v2 protocol: {exc.errors()[:3]}"))

    return app


class Guard:
    """Auth on every path but health and the API description, and the message-size limit, as plain ASGI
    middleware (FastAPI's @app.middleware wraps every request in extra tasks and streams; this costs nothing)."""

    def __init__(self, app: ASGIApp, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            try:
                if scope["path"] not in OPEN_PATHS and not auth.authorized(self.config.token,
                                                                           headers.get("authorization")):
                    raise Unauthenticated(auth.MESSAGE)
                length = int(headers.get("content-length") or 0)
                if length > self.config.max_message_bytes:
                    raise MessageTooLarge(f"the request has {length} bytes; "
                                          f"the limit is {self.config.max_message_bytes}")
            except Exception as e:
                await _error(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _timeout(request: Request) -> float | None:
    """A deadline the caller sent as `timeout` in seconds, in the Timeout header or the grpc-style header."""
    value = request.headers.get("timeout") or request.query_params.get("timeout")
    try:
        return float(value) if value else None
    except ValueError:
        raise InvalidInput(f"timeout must be a number of seconds, got {value!r}") from None


def _array(tensor: InputTensor) -> np.ndarray:
    try:
        dtype = codec.dtype_of(tensor.datatype)
    except codec.CodecError as e:
        raise InvalidInput(f"input {tensor.name!r}: {e}") from None
    if any(d < 0 for d in tensor.shape):
        raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    try:
        flat = np.asarray(tensor.data, dtype=dtype).ravel()
    except (ValueError, TypeError, OverflowError):  # OverflowError: e.g. 300 for INT8
        raise InvalidInput(f"input {tensor.name!r}: data must be numbers of {tensor.datatype}, "
                           "flat or nested, in row-major order") from None
    count = math.prod(tensor.shape)  # Python ints: huge dimensions must not wrap around
    if flat.size != count:
        raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} needs {count} values, got {flat.size}")
    try:
        return flat.reshape(tensor.shape)
    except (ValueError, OverflowError) as e:  # no values, but dimensions too large to address
        raise InvalidInput(f"input {tensor.name!r}: not a tensor of shape {tensor.shape}: {e}") from None


def _metadata(info: ModelInfo) -> dict[str, Any]:
    def tensors(specs: tuple) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"name": info.name, "versions": [info.version], "platform": info.platform,
            "inputs": tensors(info.inputs), "outputs": tensors(info.outputs), "parameters": info.properties}


def _error(error: Exception, obs: metrics.Observation | None = None) -> JSONResponse:
    status, message = status_of(error)
    if obs is not None:
        obs.status = status.grpc.name  # one status vocabulary for both protocols
    return JSONResponse({"error": message}, status_code=status.http)

