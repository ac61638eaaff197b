"""The Open Inference Protocol v2 over HTTP/JSON, on the same event loop and the same backend as gRPC.

Routes: /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../infer,
plus /metrics (Prometheus) and the OpenAPI description at /openapi.json (browsable at /docs).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from handlers import codec
from server import auth, metrics, oip
from server.backend import Backend
from server.config import ServeConfig
from server.errors import InvalidInput, MessageTooLarge, Unauthenticated, status_of

OPEN_PATHS = (*auth.OPEN_HTTP_PATHS, "/docs", "/openapi.json")
Endpoint = Callable[..., Awaitable[Response]]


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


def create_app(config: ServeConfig, backend: Backend) -> FastAPI:
    app = FastAPI(title="gradserve", version=oip.SERVER_VERSION,
                  description="Open Inference Protocol v2 (KServe v2) in front of TorchServe")

    app.add_middleware(Guard, config=config)

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
        return JSONResponse(oip.model_metadata(backend.model(model, version)))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    @route("ModelReady")
    async def model_ready(model: str, obs: metrics.Observation, version: str = "") -> JSONResponse:
        ok = backend.model_ready(model, version)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{model}/infer", response_model=InferenceResponse)
    @app.post("/v2/models/{model}/versions/{version}/infer", response_model=InferenceResponse)
    @route("ModelInfer")
    async def infer(model: str, body: InferenceRequest, request: Request, obs: metrics.Observation,
                    version: str = "") -> JSONResponse:
        inputs = {t.name: oip.from_values(t.name, t.datatype, t.shape, t.data, "data") for t in body.inputs}
        if len(inputs) != len(body.inputs):
            raise InvalidInput("an input name is given twice")
        obs.rows = max((len(x) for x in inputs.values() if x.ndim), default=0)
        requested = [o.name for o in body.outputs or ()]
        manifest, outputs = await backend.infer(model, version, inputs, requested, _timeout(request))
        return JSONResponse({
            "model_name": manifest.name, "model_version": manifest.version, "id": body.id,
            "outputs": [{"name": k, "datatype": codec.datatype_of(v.dtype), "shape": list(v.shape),
                         "data": v.ravel().tolist()} for k, v in outputs.items()]})

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
                if scope["path"] not in OPEN_PATHS and not auth.authorized(self.config.auth.token,
                                                                           headers.get("authorization")):
                    raise Unauthenticated(auth.MESSAGE)
                length = int(headers.get("content-length") or 0)
                limit = self.config.limits.max_message_bytes
                if length > limit:
                    raise MessageTooLarge(f"the request has {length} bytes; the limit is {limit}")
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


def _error(error: Exception, obs: metrics.Observation | None = None) -> JSONResponse:
    status, message = status_of(error)
    if obs is not None:
        obs.status = status.grpc.name  # one status vocabulary for both protocols
    return JSONResponse({"error": message}, status_code=status.http)

