"""Where a batch job sends its rows: the front door over gRPC, or the archive's handler in-process.

Both answer `infer(rows) -> logits` or raise `Rejected` with the status name of the error table
(INVALID_ARGUMENT, UNAVAILABLE, ...), so the job treats them alike and their outputs can be compared.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import grpc
import numpy as np

from handlers import codec

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
FATAL = frozenset({"UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED", "UNIMPLEMENTED"})


class Rejected(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Transport(Protocol):
    row_shape: tuple[int, ...]

    async def infer(self, rows: np.ndarray) -> np.ndarray: ...

    async def close(self) -> None: ...


class GrpcTransport:
    """ModelInfer on the front door with raw tensor bytes, a deadline on every call."""

    def __init__(self, target: str, model: str, token: str | None, timeout_s: float) -> None:
        from server.generated import grpc_service_pb2 as pb
        from server.generated import grpc_service_pb2_grpc as pb_grpc

        self._pb = pb
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._model = model
        self._timeout = timeout_s
        self.row_shape: tuple[int, ...] = ()
        self._input = "input"

    async def connect(self) -> GrpcTransport:
        meta = await self._call(self._stub.ModelMetadata, self._pb.ModelMetadataRequest(name=self._model))
        self._input = meta.inputs[0].name
        self.row_shape = tuple(int(d) for d in meta.inputs[0].shape[1:])
        return self

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        request = self._pb.ModelInferRequest(model_name=self._model)
        tensor = request.inputs.add(name=self._input, datatype="FP32")
        tensor.shape.extend(rows.shape)
        request.outputs.add(name="logits")
        request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        response = await self._call(self._stub.ModelInfer, request)
        out = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(tuple(out.shape))

    async def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise Rejected(e.code().name, e.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


class LocalTransport:
    """The archive's own handler, run in this process: the same code TorchServe runs, with no server."""

    def __init__(self, archive: Path) -> None:
        from handlers.handler import DigitsHandler

        self._dir = tempfile.TemporaryDirectory(prefix="gradserve-local-")
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(self._dir.name)
        model_dir = Path(self._dir.name)
        spec = json.loads((model_dir / "gradserve.json").read_text())
        self.row_shape = tuple(spec["inputs"][0]["shape"][1:])
        self._handler = DigitsHandler()
        self._context = SimpleNamespace(
            system_properties={"model_dir": str(model_dir), "gpu_id": None},
            model_yaml_config={"maxWorkers": 1},
            manifest={},
        )
        self._handler.initialize(self._context)

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        payload = codec.encode({"input": np.ascontiguousarray(rows, dtype=np.float32)})
        (answer,) = await asyncio.to_thread(self._handler.handle, [{"data": payload}], self._context)
        message = codec.decode(answer)
        if message.error is not None:
            raise Rejected(message.error.code, message.error.message)
        return message.tensors["logits"]

    async def close(self) -> None:
        self._dir.cleanup()
