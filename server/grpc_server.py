"""Build the grpc.aio server: the inference service, grpc.health.v1 (SERVING while the backend is ready),
server reflection, auth, message-size limits and optional TLS. Serving it is the caller's business, so
tests bind port 0 and dial the port they got."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.auth import TokenInterceptor
from server.backend import Backend
from server.config import ServeConfig
from server.generated import grpc_service_pb2, grpc_service_pb2_grpc
from server.grpc_servicer import InferenceServicer

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def create_server(config: ServeConfig, backend: Backend) -> tuple[grpc.aio.Server, int]:
    limit = config.max_message_bytes
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(config.token)] if config.token else [],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", 0),
                 # Close connections after a few minutes (in-flight calls get a grace period) so clients
                 # balancing round-robin over DNS re-resolve and find replicas the autoscaler added.
                 ("grpc.max_connection_age_ms", config.max_connection_age_s * 1000),
                 ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000))],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(backend), server)

    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(backend), server)

    services = (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)

    address = f"{config.host}:{config.grpc_port}"
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                    Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}: the port is taken or the host is not local")
    return server, port


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING exactly while the backend is ready, for "" and the inference service."""

    SERVICES = ("", INFERENCE_SERVICE)

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        previous = backend.on_ready_change

        def changed(ready: bool) -> None:
            previous(ready)
            task = asyncio.get_running_loop().create_task(self._notify())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        backend.on_ready_change = changed

    def status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        ok = self._backend.ready()
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status())

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status() if request.service in self.SERVICES else \
                health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            async with self._changed:
                await self._changed.wait()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
