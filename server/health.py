"""grpc.health.v1 for the front door: SERVING exactly while the backend is ready (every model served, not
draining), for the whole server ("") and for the inference service. Probes and load balancers ask it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.backend import Backend
from server.generated import grpc_service_pb2

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING exactly while the backend is ready, for "" and the inference service."""

    SERVICES = ("", INFERENCE_SERVICE)

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        backend.add_ready_listener(self._ready_changed)

    def _ready_changed(self, ready: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._notify())  # wakes the Watch streams
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        def current() -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
            return self.status() if request.service in self.SERVICES else \
                health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

        while True:
            status = current()
            yield health_pb2.HealthCheckResponse(status=status)
            async with self._changed:
                # Checked under the lock, not only woken: a change made while this stream was suspended at its
                # yield is seen here rather than lost.
                await self._changed.wait_for(lambda seen=status: current() != seen)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
