"""The Open Inference Protocol v2 over gRPC: each RPC validates, converts, awaits the backend, converts back.

`@rpc(method)` is the one place a unary RPC is counted in the metrics and a failure becomes its status from the
error table (server/errors.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np

from handlers import codec
from handlers.manifest import Manifest
from server import auth, client_shm, metrics, oip
from server.auth import Tokens, grpc_authorized
from server.backend import Backend
from server.errors import InvalidInput, Unauthenticated, status_of
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext, metrics.Observation], Awaitable[Response]]

TYPED_IN_THREAD = 65536  # typed values in a request beyond which it is decoded in a thread (floats excepted)
STREAM_WINDOW = 16  # requests of one ModelStreamInfer stream answered at once
REGION_BYTES_IN_THREAD = 1 << 20  # bytes from a client's shared memory beyond which a request reads in a thread

# Typed contents field for each datatype (the protocol packs the small integer types into 32 bits).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# On the wire a packed repeated float or double field is its values as little-endian bytes: typed FP32 and FP64
# contents are read from there (`_wire_floats`), not element by element.
WIRE_FLOATS = {"FP32": "<f4", "FP64": "<f8"}


def rpc(method: str, names_model: bool = True
        ) -> Callable[[Handler[Request, Response]],
                      Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]]:
    """A unary RPC that needs the token, observed under `method` (the model is the request's `name` or
    `model_name`, unless `names_model` is false: a shared memory region's name is not a model's), whose
    exceptions end the call with their status and message."""
    def decorate(handler: Handler[Request, Response]
                 ) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
        @functools.wraps(handler)
        async def wrapped(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
            model = (getattr(request, "model_name", None) or getattr(request, "name", "")) if names_model else ""
            with metrics.observe("grpc", method, model) as obs:
                try:
                    if not grpc_authorized(self.tokens, context):
                        raise Unauthenticated(auth.MESSAGE)
                    return await handler(self, request, context, obs)
                except Exception as e:  # noqa: BLE001 - the error table decides what the caller hears
                    status, message = status_of(e)
                    obs.status = status.grpc.name
                    await context.abort(status.grpc, message)
                    raise AssertionError("context.abort raises") from None
        return wrapped
    return decorate


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's service. ServerLive and ServerReady answer anyone (they are health); every other method
    needs the token."""

    def __init__(self, backend: Backend, tokens: Tokens) -> None:
        self._backend = backend
        self.tokens = tokens

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._backend.ready())

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext,
                             obs: metrics.Observation) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    @rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext,
                         obs: metrics.Observation) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._backend.model_ready(request.name, request.version))

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext,
                            obs: metrics.Observation) -> pb.ModelMetadataResponse:
        return model_metadata(self._backend.metadata(request.name, request.version))

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
                         obs: metrics.Observation) -> pb.ModelInferResponse:
        return await self._infer(request, obs, context.time_remaining())

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently, at most STREAM_WINDOW of them (then the stream is not read further, and
        gRPC's flow control holds the client back); responses leave in request order; a failed request gets its
        error in its own response and the stream goes on."""
        if not grpc_authorized(self.tokens, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth.MESSAGE)
        answers: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    answers.put_nowait(asyncio.create_task(self._stream_one(request)))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        task = None
        try:
            while (task := await answers.get()) is not None:
                answer = await task
                window.release()
                yield answer
            await reader  # re-raises a broken request stream
        finally:
            reader.cancel()
            # The stream ended early (the client went away): what it asked for and will never read is dropped.
            pending = [task] + [answers.get_nowait() for _ in range(answers.qsize())]
            for left in pending:
                if left is not None:
                    left.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        with metrics.observe("grpc", "ModelStreamInfer", request.model_name) as obs:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, obs, None))
            except Exception as e:  # noqa: BLE001 - the error travels in this request's own response
                status, message = status_of(e)
                obs.status = status.grpc.name
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                return pb.ModelStreamInferResponse(error_message=f"{status.grpc.name}: {message}",
                                                   infer_response=echo)

    @rpc("SystemSharedMemoryRegister", names_model=False)
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext, obs: metrics.Observation
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self._backend.regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("SystemSharedMemoryUnregister", names_model=False)
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext, obs: metrics.Observation
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._backend.regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc("SystemSharedMemoryStatus", names_model=False)
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext, obs: metrics.Observation
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={r["name"]: status(**r) for r in self._backend.regions.status(request.name)})

    async def _infer(self, request: pb.ModelInferRequest, obs: metrics.Observation, timeout: float | None
                     ) -> pb.ModelInferResponse:
        regions = self._backend.regions
        targets = {o.name: regions.target(o.name, _values(o.parameters)) for o in request.outputs
                   if client_shm.wants_region(o.parameters)}  # checked before the model runs
        # Raw contents decode without a copy; many typed values, or a region's bytes, take a while: off the event
        # loop, then.
        typed = sum(len(getattr(t.contents, CONTENTS_FIELD.get(t.datatype, "fp32_contents"))) for t in request.inputs
                    if t.HasField("contents") and t.datatype not in WIRE_FLOATS)
        in_region = sum(_int_param(t.parameters[client_shm.BYTE_SIZE]) for t in request.inputs
                        if client_shm.BYTE_SIZE in t.parameters)
        if typed > TYPED_IN_THREAD or in_region > REGION_BYTES_IN_THREAD:
            inputs = await asyncio.to_thread(decode_inputs, request, regions)
        else:
            inputs = decode_inputs(request, regions)
        obs.rows = max((len(x) for x in inputs.values() if x.ndim), default=0)
        requested = [o.name for o in request.outputs]
        manifest, outputs = await self._backend.infer(request.model_name, request.model_version, inputs, requested,
                                                      timeout)
        if sum(outputs[name].nbytes for name in targets) > REGION_BYTES_IN_THREAD:
            return await asyncio.to_thread(encode_outputs, manifest, request.id, outputs, targets, regions)
        return encode_outputs(manifest, request.id, outputs, targets, regions)


def model_metadata(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    """ModelMetadata from the protocol's JSON (server/oip.py builds it for both transports)."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        parameters={k: parameter(v) for k, v in meta["parameters"].items()})


def parameter(value: str | int | float | bool) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _int_param(value: pb.InferParameter) -> int:
    return value.int64_param or value.uint64_param


def decode_inputs(request: pb.ModelInferRequest, regions: client_shm.Regions | None = None
                  ) -> dict[str, np.ndarray]:
    """The request's input tensors, from raw_input_contents (zero-copy views; BYTES length-prefixed), typed
    contents, or a registered shared memory region (an input whose parameters name one has no raw contents)."""
    raw = list(request.raw_input_contents)
    in_memory = [t for t in request.inputs if client_shm.REGION not in t.parameters]
    if raw and len(raw) != len(in_memory):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(in_memory)} inputs not in shared "
                           "memory; send one per such input, in the order of `inputs`")
    inputs: dict[str, np.ndarray] = {}
    given = iter(raw)
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if client_shm.REGION in tensor.parameters:
            if regions is None:
                raise InvalidInput(f"input {tensor.name!r}: this server reads no shared memory")
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {tensor.name!r}: send a shared memory region or contents, not both")
            data = regions.read(tensor.name, _values(tensor.parameters))
            inputs[tensor.name] = oip.from_bytes(tensor.name, tensor.datatype, tensor.shape, data)
        else:
            inputs[tensor.name] = decode_input(tensor, next(given) if raw else None)
    return inputs


def _values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A tensor's parameters as plain values."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in parameters.items()}


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r}: send raw_input_contents or contents, not both")
        return oip.from_bytes(tensor.name, tensor.datatype, tensor.shape, raw)
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} has no typed contents field; "
                           "send it in raw_input_contents")
    values = _wire_floats(tensor.contents, field, tensor.datatype)
    return oip.from_values(tensor.name, tensor.datatype, tensor.shape,
                           getattr(tensor.contents, field) if values is None else values, f"contents.{field}")


def _wire_floats(contents: pb.InferTensorContents, field: str, datatype: str) -> np.ndarray | None:
    """Typed FP32/FP64 contents as an array straight from their wire bytes (786,432 of them: 0.2 ms, against 45 ms
    element by element); None for another datatype, or when the contents hold anything else, or nothing."""
    dtype = WIRE_FLOATS.get(datatype)
    fields = contents.ListFields() if dtype is not None else ()
    if len(fields) != 1 or fields[0][0].name != field:
        return None
    wire = contents.SerializeToString()  # this one field: its tag, its byte length, its values
    at, nbytes = _varint(wire, _varint(wire, 0)[0])
    return np.frombuffer(wire, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=at)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(the position after it, the value) of the protobuf varint at `at`."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return at, value


def encode_outputs(manifest: Manifest, request_id: str, outputs: dict[str, np.ndarray],
                   targets: Mapping[str, client_shm.Target] | None = None,
                   regions: client_shm.Regions | None = None) -> pb.ModelInferResponse:
    """Every output in raw_output_contents (BYTES length-prefixed), as Triton's clients expect; one with a
    `targets` entry is written to that shared memory region instead, its place in raw_output_contents empty."""
    response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version, id=request_id)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        target = targets.get(name) if targets else None
        if target is not None and regions is not None:
            regions.write(target, oip.to_raw(array))
            response.raw_output_contents.append(b"")
        else:
            response.raw_output_contents.append(oip.to_raw(array))
    return response
