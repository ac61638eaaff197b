"""Bearer-token authentication for every call but health, on gRPC (an interceptor) and HTTP (a check the
REST app runs). Health stays open so that probes and load balancers need no secret."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# gRPC methods that answer without a token: the standard health service and the protocol's health calls.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                      "/inference.GRPCInferenceService/ServerReady")
OPEN_HTTP_PATHS = ("/v2/health/live", "/v2/health/ready")
MESSAGE = "missing or wrong credentials: send the header 'authorization: Bearer <token>'"


def authorized(token: str | None, header: str | None) -> bool:
    """True when no token is configured, or `header` is "Bearer <token>"."""
    if token is None:
        return True
    expected = f"Bearer {token}".encode()
    return header is not None and hmac.compare_digest(header.encode(), expected)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization")
        if authorized(self._token, header if isinstance(header, str) else None):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
