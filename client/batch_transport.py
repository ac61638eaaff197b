"""Where a batch job sends its rows: the front door over gRPC, or the archive's handler in-process.

Both answer `infer(input name, rows) -> Answer` (logits and class names, or predictions) or raise `Rejected`
with the status name of the error table (INVALID_ARGUMENT, UNAVAILABLE, ...), so the job treats them alike and
their outputs can be compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import numpy as np

from client.contract import ModelContract, metadata_dict
from handlers import codec

T = TypeVar("T")

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
FATAL = frozenset({"UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED", "UNIMPLEMENTED"})


class Rejected(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Answer:
    """The rows' scores: logits [n, K] and class names [n] (classification), or predictions [n, T]."""

    values: np.ndarray
    names: np.ndarray | None = None


class Transport(Protocol):
    contract: ModelContract

    async def infer(self, input_name: str, rows: np.ndarray) -> Answer: ...

    async def close(self) -> None: ...


def wanted(contract: ModelContract) -> tuple[str, ...]:
    """The outputs a job asks for, served or local: what `answer` reads (the handler computes nothing else)."""
    return ("prediction",) if contract.task == "regression" else ("logits", "class_name")


def answer(contract: ModelContract, outputs: dict[str, np.ndarray]) -> Answer:
    if contract.task == "regression":
        return Answer(np.asarray(outputs["prediction"], dtype=np.float32))
    names = np.array([n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in outputs["class_name"]])
    return Answer(np.asarray(outputs["logits"], dtype=np.float32), names)


class GrpcTransport:
    """ModelInfer on the front door (client/grpc_client.py: raw tensor bytes, a deadline on every call)."""

    def __init__(self, target: str, model: str, token: str | None, timeout_s: float) -> None:
        from client.grpc_client import Client

        self._client = Client(target, token=token, timeout=timeout_s)
        self._model = model

    async def connect(self) -> GrpcTransport:
        self.contract = ModelContract.from_metadata(metadata_dict(await _rejecting(self._client.metadata(self._model))))
        return self

    async def infer(self, input_name: str, rows: np.ndarray) -> Answer:
        outputs = await _rejecting(self._client.infer(self._model, rows, outputs=wanted(self.contract),
                                                      input_name=input_name))
        return answer(self.contract, outputs)

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
        self.contract = ModelContract.from_manifest(self._model.manifest)

    async def infer(self, input_name: str, rows: np.ndarray) -> Answer:
        data = rows if input_name == "image" else np.ascontiguousarray(rows, dtype=np.float32)
        request = codec.encode({input_name: data}, wanted(self.contract))
        (reply,) = await asyncio.to_thread(self._model.handle, [request])
        message = codec.decode(reply)
        if message.error is not None:
            raise Rejected(message.error.code, message.error.message)
        return answer(self.contract, message.tensors)

    async def close(self) -> None:
        self._model.close()
