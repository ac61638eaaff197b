"""The Open Inference Protocol v2 over HTTP, on the same event loop and the same backend as gRPC.

Routes: /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../infer,
plus /metrics (Prometheus) and the OpenAPI description at /openapi.json (browsable at /docs). How an inference
request and its answer look on the wire (JSON, Triton's binary extension) is server/rest_wire.py.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import auth, client_shm, metrics, oip
from server.backend import Backend
from server.config import ServeConfig
from server.errors import InvalidInput, MessageTooLarge, Unauthenticated, status_of
from server.rest_wire import (
    HEADER_LENGTH,
    INFER_DOCS,
    Inference,
    InferenceResponse,
    body_of,
    describe_inference_request,
    inference_response,
    read_inference,
)

INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
PARSE_IN_THREAD_BYTES = 256 * 1024  # a body larger than this parses off the event loop
Endpoint = Callable[..., Awaitable[Response]]


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
        return JSONResponse({"name": model, "ready": True})

    @app.post("/v2/models/{model}/infer", response_model=InferenceResponse, **INFER_DOCS)
    @app.post("/v2/models/{model}/versions/{version}/infer", response_model=InferenceResponse, **INFER_DOCS)
    async def infer(model: str, request: Request, version: str = "") -> Response:
        """Described here for /openapi.json; Guard answers these requests before FastAPI routes them."""
        return await infer_endpoint(request, backend, config, model=model, version=version)

    _shared_memory_routes(app, backend)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(InvalidInput(f"the body is not an inference request of the v2 protocol: {exc.errors()[:3]}"))

    describe_inference_request(app)
    return app


def _shared_memory_routes(app: FastAPI, backend: Backend) -> None:
    """Triton's system shared memory extension (server/client_shm.py): inputs read from, and outputs written to,
    the client's memory."""
    @app.post("/v2/systemsharedmemory/region/{region}/register")
    @route("SystemSharedMemoryRegister")
    async def register_region(region: str, request: Request, obs: metrics.Observation) -> JSONResponse:
        try:
            asked = json.loads(await request.body())
        except ValueError:
            asked = None
        if not isinstance(asked, dict) or not isinstance(asked.get("key"), str) \
                or not all(type(asked.get(k, 0)) is int for k in ("offset", "byte_size")):
            raise InvalidInput('register a region with {"key": "/name", "offset": 0, "byte_size": N}')
        backend.regions.register(region, asked["key"], asked.get("offset", 0), asked.get("byte_size", 0))
        return JSONResponse({})

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{region}/unregister")
    @route("SystemSharedMemoryUnregister")
    async def unregister_region(obs: metrics.Observation, region: str = "") -> JSONResponse:
        backend.regions.unregister(region)
        return JSONResponse({})

    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{region}/status")
    @route("SystemSharedMemoryStatus")
    async def region_status(obs: metrics.Observation, region: str = "") -> JSONResponse:
        return JSONResponse(backend.regions.status(region))


@route("ModelInfer")
async def infer_endpoint(request: Request, backend: Backend, config: ServeConfig, obs: metrics.Observation, *,
                         model: str, version: str) -> Response:
    """POST .../infer (called with model= and version=, which `route` observes)."""
    call = await _read_call(request, backend, model, version, config.limits.max_message_bytes)
    obs.rows = max((len(x) for x in call.inputs.values() if x.ndim), default=0)
    manifest, outputs = await backend.infer(model, version, call.inputs, call.outputs, _timeout(request))
    if sum(outputs[name].nbytes for name in call.targets) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(inference_response, manifest, call, outputs, backend.regions)
    return inference_response(manifest, call, outputs, backend.regions)


async def _read_call(request: Request, backend: Backend, model: str, version: str, max_bytes: int) -> Inference:
    """The request's body, read within the size limits and parsed (a large one in a thread: other clients are
    not held up). A compressed body was read within max_bytes; inflated, it is held to its model's limit too."""
    header_length = request.headers.get(HEADER_LENGTH)
    limit = backend.body_limit(model, version, binary=header_length is not None)
    body = await body_of(request, min(max_bytes, limit or max_bytes))
    if len(body) > PARSE_IN_THREAD_BYTES or client_shm.REGION.encode() in body:  # a region: its bytes are read too
        return await asyncio.to_thread(read_inference, body, header_length, backend.regions)
    return read_inference(body, header_length, backend.regions)


class Guard:
    """Auth on every path but health, and the size limit of a request's body, as plain ASGI middleware
    (FastAPI's @app.middleware wraps every request in extra tasks and streams; this costs nothing). Inference
    requests go from here straight to their endpoint: FastAPI's routing, parameter solving and middleware cost
    a single-row request more CPU than its endpoint.

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
                infer = INFER_PATH.fullmatch(scope["path"]) if scope["method"] == "POST" else None
                limit = self._limit(infer, headers)
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
            if infer is not None:
                response = await infer_endpoint(Request(scope, receive), self.backend, self.config,
                                                 model=infer["model"], version=infer["version"] or "")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _limit(self, match: re.Match[str] | None, headers: Headers) -> int:
        limit = self.config.limits.max_message_bytes
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


# --- helpers ------------------------------------------------------------------------------------------------------

def _timeout(request: Request) -> float | None:
    """A deadline the caller sent as `timeout` in seconds, in the `timeout` header or query parameter."""
    value = request.headers.get("timeout") or request.query_params.get("timeout")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise InvalidInput(f"timeout must be a positive number of seconds, got {value!r}")
    return seconds


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
