"""A small asyncio client of the front door's gRPC API, with a deadline on every call.

    async with Client("127.0.0.1:8001", token="...") as client:
        outputs = await client.infer("digits", x)          # x: float32 [n, 1, 8, 8]
        outputs["label"], outputs["probabilities"]

A BYTES tensor (e.g. encoded image files, one per row) is a numpy object array of `bytes`:
`client.infer("model", np.array([png1, png2], dtype=object), input_name="image")`.

Failed calls raise grpc.aio.AioRpcError; its .code() is the error table's status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np

from handlers import codec
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc

MiB = 1024 * 1024


class Client:
    def __init__(self, target: str, token: str | None = None, timeout: float = 30.0,
                 tls_ca: str | Path | None = None, max_message_bytes: int = 64 * MiB,
                 load_balancing: str | None = None) -> None:
        """`load_balancing="round_robin"` spreads calls over every address the target resolves to
        (e.g. `dns:///gradserve-headless:8001` in Kubernetes, or `ipv4:host1:port1,host2:port2`)."""
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if load_balancing:
            options.append(("grpc.lb_policy_name", load_balancing))
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self, timeout: float | None = None) -> bool:
        response = await self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout or self.timeout,
                                                metadata=self._metadata)
        return response.ready

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the server is ready (the channel connects as soon as the server listens)."""
        await self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, wait_for_ready=True,
                                     metadata=self._metadata)

    async def metadata(self, model: str, timeout: float | None = None) -> pb.ModelMetadataResponse:
        return await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout or self.timeout,
                                              metadata=self._metadata)

    async def infer(self, model: str, x: np.ndarray, outputs: Sequence[str] = (), request_id: str = "",
                    timeout: float | None = None, input_name: str = "input") -> dict[str, np.ndarray]:
        """The model's outputs for the rows of `x` (all outputs unless `outputs` names some)."""
        response = await self._stub.ModelInfer(request(model, x, outputs, request_id, input_name),
                                               timeout=timeout or self.timeout, metadata=self._metadata)
        return decode(response)


def request(model: str, x: np.ndarray, outputs: Sequence[str] = (), request_id: str = "",
            input_name: str = "input") -> pb.ModelInferRequest:
    """A ModelInferRequest carrying `x` in raw_input_contents (BYTES in the protocol's length-prefixed form)."""
    x = np.asarray(x)
    datatype = codec.datatype_of(x.dtype)
    message = pb.ModelInferRequest(model_name=model, id=request_id,
                                   outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])
    message.inputs.add(name=input_name, datatype=datatype, shape=x.shape)
    if datatype == codec.BYTES:
        message.raw_input_contents.append(codec.serialize_bytes(x))
    else:
        message.raw_input_contents.append(np.ascontiguousarray(x, codec.dtype_of(datatype)).tobytes())
    return message


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs from raw_output_contents: views on the response's bytes; BYTES as object arrays of bytes."""
    return {t.name: _array(t.datatype, tuple(t.shape), raw)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)}


def _array(datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    if datatype == codec.BYTES:
        return codec.deserialize_bytes(raw, math.prod(shape)).reshape(shape)
    return np.frombuffer(raw, dtype=codec.dtype_of(datatype)).reshape(shape)
