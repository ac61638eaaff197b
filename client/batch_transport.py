"""Where a batch job sends its rows: the front door over gRPC, or the archive's handler in-process.

Both answer `infer(rows) -> logits` or raise `Rejected` with the status name of the error table
(INVALID_ARGUMENT, UNAVAILABLE, ...), so the job treats them alike and their outputs can be compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import numpy as np

from handlers import codec

T = TypeVar("T")

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
    """ModelInfer on the front door (client/grpc_client.py: raw tensor bytes, a deadline on every call)."""

    def __init__(self, target: str, model: str, token: str | None, timeout_s: float) -> None:
        from client.grpc_client import Client

        self._client = Client(target, token=token, timeout=timeout_s)
        self._model = model
        self._input = "input"
        self.row_shape: tuple[int, ...] = ()

    async def connect(self) -> GrpcTransport:
        meta = await _rejecting(self._client.metadata(self._model))
        self._input = meta.inputs[0].name
        self.row_shape = tuple(int(d) for d in meta.inputs[0].shape[1:])
        return self

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        outputs = await _rejecting(self._client.infer(self._model, rows, outputs=("logits",),
                                                      input_name=self._input))
        return outputs["logits"]

    async def close(self) -> None:
        await self._client.close()


async def _rejecting(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise Rejected(e.code().name, e.details() or "") from None


class LocalTransport:
    """The archive's own handler, run in this process: the same code TorchServe runs, with no server."""

    def __init__(self, archive: Path) -> None:
        from handlers.local import LocalModel

        self._model = LocalModel(archive)
        self._input = self._model.manifest.input.name
        self.row_shape = self._model.manifest.input.row_shape

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        payload = codec.encode({self._input: np.ascontiguousarray(rows, dtype=np.float32)})
        (answer,) = await asyncio.to_thread(self._model.handle, [payload])
        message = codec.decode(answer)
        if message.error is not None:
            raise Rejected(message.error.code, message.error.message)
        return message.tensors["logits"]

    async def close(self) -> None:
        self._model.close()
