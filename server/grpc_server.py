"""Build the grpc.aio server: the inference service, grpc.health.v1 (SERVING while the backend is ready),
server reflection, auth, message-size limits and optional TLS. Serving it is the caller's business, so
tests bind port 0 and dial the port they got."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from server import auth
from server.auth import Tokens, grpc_authorized
from server.backend import Backend
from server.config import ServeConfig
from server.generated import grpc_service_pb2_grpc
from server.grpc_servicer import InferenceServicer
from server.health import INFERENCE_SERVICE, ReadinessHealth


def create_server(config: ServeConfig, backend: Backend, tokens: Tokens, share_port: bool = False
                  ) -> tuple[grpc.aio.Server, int]:
    """The server, and the port it will listen on. `share_port`: its listener joins those of the other
    front-door processes on the port (SO_REUSEPORT, server/doors.py); else a port in use is an error."""
    limit, listen = config.limits.max_message_bytes, config.listen
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", int(share_port)),
                 # Close connections after a few minutes (in-flight calls get a grace period) so clients
                 # balancing round-robin over DNS re-resolve and find replicas the autoscaler added.
                 ("grpc.max_connection_age_ms", listen.max_connection_age_s * 1000),
                 ("grpc.max_connection_age_grace_ms", int(config.shutdown.grace_s * 1000))],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(backend, tokens), server)

    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(backend), server)

    services = (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(AuthorizedReflection(services, tokens), server)

    address = f"{listen.host}:{listen.grpc_port}"
    if listen.tls_cert and listen.tls_key:
        credentials = grpc.ssl_server_credentials([(Path(listen.tls_key).read_bytes(),
                                                    Path(listen.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}: the port is taken or the host is not local")
    return server, port


class AuthorizedReflection(ReflectionServicer):
    """Server reflection (grpcurl, Postman) for callers with the token, as every other method but health."""

    def __init__(self, services: tuple[str, ...], tokens: Tokens) -> None:
        super().__init__(services)
        self._tokens = tokens

    async def ServerReflectionInfo(self, request_iterator: AsyncIterable[Any], context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
        if not grpc_authorized(self._tokens, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth.MESSAGE)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response
