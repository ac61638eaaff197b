"""The Open Inference Protocol v2 over gRPC: validate, convert, await the backend, convert back."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
import numpy as np

from handlers import codec
from server import metrics
from server.backend import Backend
from server.errors import InvalidInput, status_of
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc
from server.models import ModelInfo

SERVER_NAME = "gradserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_stream_infer",)

# Typed contents field for each datatype (the protocol packs the small integer types into 32 bits).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._backend.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        with metrics.observe("grpc", "ModelReady", request.name) as obs:
            try:
                return pb.ModelReadyResponse(ready=self._backend.model_ready(request.name, request.version))
            except Exception as e:
                await _abort(context, obs, e)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        with metrics.observe("grpc", "ModelMetadata", request.name) as obs:
            try:
                return model_metadata(self._backend.model(request.name, request.version))
            except Exception as e:
                await _abort(context, obs, e)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        with metrics.observe("grpc", "ModelInfer", request.model_name) as obs:
            try:
                return await self._infer(request, context.time_remaining(), obs)
            except Exception as e:
                await _abort(context, obs, e)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; responses leave in request order; a failed request gets its error in
        its own response and the stream goes on."""
        answers: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in requests:
                    answers.put_nowait(asyncio.create_task(self._stream_one(request, context)))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                yield await task
            await reader  # re-raises a broken request stream
        finally:
            reader.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ModelStreamInferResponse:
        with metrics.observe("grpc", "ModelStreamInfer", request.model_name) as obs:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, None, obs))
            except Exception as e:
                status, message = status_of(e)
                obs.status = status.grpc.name
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                return pb.ModelStreamInferResponse(error_message=f"{status.grpc.name}: {message}",
                                                   infer_response=echo)

    async def _infer(self, request: pb.ModelInferRequest, timeout: float | None, obs: metrics.Observation
                     ) -> pb.ModelInferResponse:
        inputs = decode_inputs(request)
        obs.rows = max((len(x) for x in inputs.values() if x.ndim), default=0)
        requested = [o.name for o in request.outputs]
        info, outputs = await self._backend.infer(request.model_name, request.model_version, inputs, requested,
                                                  timeout)
        return encode_outputs(info, request.id, outputs)


async def _abort(context: grpc.aio.ServicerContext, obs: metrics.Observation, error: Exception) -> NoReturn:
    status, message = status_of(error)
    obs.status = status.grpc.name
    await context.abort(status.grpc, message)
    raise AssertionError("context.abort raises")


def model_metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    def tensors(specs: tuple) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in specs]

    return pb.ModelMetadataResponse(
        name=info.name, versions=[info.version], platform=info.platform, inputs=tensors(info.inputs),
        outputs=tensors(info.outputs), parameters={k: parameter(v) for k, v in info.properties.items()})


def parameter(value: str | int | float | bool) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors, from raw_input_contents (zero-copy views) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                           "send one per input, in the order of `inputs`")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = _decode_input(tensor, raw[i] if raw else None)
    return inputs


def _decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    try:
        dtype = codec.dtype_of(tensor.datatype)
    except codec.CodecError as e:
        raise InvalidInput(f"input {tensor.name!r}: {e}") from None
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: a product of huge dimensions must not wrap around to a small one
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r}: send raw_input_contents or contents, not both")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
                               f"{count * dtype.itemsize} bytes of raw_input_contents, got {len(raw)}")
        return _shaped(tensor, lambda: np.frombuffer(raw, dtype=dtype))
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} has no typed contents field; "
                           "send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} needs {count} values in "
                           f"contents.{field}, got {len(values)}")
    return _shaped(tensor, lambda: np.array(values, dtype=dtype))


def _shaped(tensor: pb.ModelInferRequest.InferInputTensor, flat: Callable[[], np.ndarray]) -> np.ndarray:
    """numpy's refusals (a value out of the datatype's range, an empty tensor with dimensions too large to
    address) are the caller's mistake, not ours."""
    try:
        return flat().reshape(tuple(tensor.shape))
    except (OverflowError, ValueError) as e:
        raise InvalidInput(f"input {tensor.name!r}: not a {tensor.datatype} tensor of shape "
                           f"{list(tensor.shape)}: {e}") from None


def encode_outputs(info: ModelInfo, request_id: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=info.name, model_version=info.version, id=request_id)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response
