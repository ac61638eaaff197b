"""A closed-loop asyncio load generator: N workers, each sending back-to-back requests for a fixed window.

    target = OipGrpc("127.0.0.1:8001", token="...", model="digits")
    senders = await target.open(x, concurrency=64)      # payloads are encoded here, outside the timed loop
    window = await closed_loop(senders, seconds=5.0)    # per-request latencies and errors
    await target.close()

A sender writes pre-encoded bytes and checks the answer (status, and the row count where that is cheap);
anything it raises counts as an error. gRPC targets open one channel (one TCP connection) per 16 workers and
skip protobuf serialization on the way out; REST targets keep one HTTP/1.1 connection per worker (gradserve/http1.py:
a request prepared once as bytes, the answer read by its length: tens of microseconds of CPU per request).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
import numpy as np

from client import grpc_client as fd_client
from gradserve import http1
from handlers import codec
from server.generated import grpc_service_pb2 as pb
from server.generated import torchserve_pb2

Send = Callable[[], Awaitable[None]]
WORKERS_PER_CHANNEL = 16
MiB = 1024 * 1024
PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


class AnswerError(Exception):
    """The server answered, but not with this request's rows."""


@dataclass
class Window:
    concurrency: int
    rows: int  # rows per request
    seconds: float
    latencies: np.ndarray  # seconds, successful requests only
    errors: int
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies)
        p50, p90, p99 = (1000 * np.percentile(self.latencies, [50, 90, 99])) if ok else (float("nan"),) * 3
        return {"requests": ok, "errors": self.errors, "seconds": self.seconds,
                "req_s": ok / self.seconds, "rows_s": ok * self.rows / self.seconds,
                "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
                "error_samples": self.error_samples}


async def closed_loop(senders: list[Send], seconds: float, rows: int = 1) -> Window:
    """Each sender in its own worker, back to back, until `seconds` have passed; requests started before the
    end finish and count, and the window lasts until the last of them."""
    clock = time.perf_counter
    latencies: list[list[float]] = [[] for _ in senders]
    errors: list[str] = []
    start = clock()
    stop = start + seconds

    async def worker(send: Send, record: list[float]) -> None:
        while (began := clock()) < stop:
            try:
                await send()
            except Exception as e:  # noqa: BLE001 - every failure is an error of the window, whatever it is
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            record.append(clock() - began)

    await asyncio.gather(*(worker(s, r) for s, r in zip(senders, latencies, strict=True)))
    elapsed = clock() - start
    return Window(len(senders), rows, elapsed, np.fromiter((x for r in latencies for x in r), dtype=np.float64),
                  len(errors), sorted(set(errors))[:3])


class Target(ABC):
    """One way into the stack; `open` builds the payload for rows `x` and one sender per worker."""

    @abstractmethod
    async def open(self, x: np.ndarray, concurrency: int) -> list[Send]: ...

    @abstractmethod
    async def close(self) -> None: ...


class _Grpc(Target):
    def __init__(self, target: str, token: str | None) -> None:
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channels: list[grpc.aio.Channel] = []

    def _open_channels(self, concurrency: int) -> None:
        # A local subchannel pool gives each channel its own connection (the global pool would share one).
        options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB),
                   ("grpc.use_local_subchannel_pool", 1)]
        count = -(-concurrency // WORKERS_PER_CHANNEL)
        self.channels = [grpc.aio.insecure_channel(self.target, options=options) for _ in range(count)]

    def _channel(self, worker: int) -> grpc.aio.Channel:
        return self.channels[worker // WORKERS_PER_CHANNEL]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))
        self.channels = []


class _GrpcUnary(_Grpc):
    method = ""

    def payload(self, x: np.ndarray) -> bytes:
        raise NotImplementedError

    def check(self, answer: bytes, rows: int) -> None:
        raise NotImplementedError

    async def open(self, x: np.ndarray, concurrency: int) -> list[Send]:
        self._open_channels(concurrency)
        payload, rows, metadata = self.payload(x), len(x), self.metadata
        # No serializers: the bytes go out as they are, the answer comes back as bytes.
        calls = [c.unary_unary(self.method) for c in self.channels]

        def sender(call: grpc.aio.UnaryUnaryMultiCallable) -> Send:
            async def send() -> None:
                self.check(await call(payload, metadata=metadata, timeout=30), rows)
            return send

        return [sender(calls[w // WORKERS_PER_CHANNEL]) for w in range(concurrency)]


class TorchServeGrpc(_GrpcUnary):
    """TorchServe's own Predictions, the handler's codec bytes in `input["data"]`."""

    method = PREDICTIONS

    def __init__(self, target: str, token: str, model: str) -> None:
        super().__init__(target, token)
        self.model = model

    def payload(self, x: np.ndarray) -> bytes:
        request = torchserve_pb2.PredictionsRequest(model_name=self.model, input={"data": codec.encode({"input": x})})
        return request.SerializeToString()

    def check(self, answer: bytes, rows: int) -> None:
        check_codec(torchserve_pb2.PredictionResponse.FromString(answer).prediction, rows)


class OipGrpc(_GrpcUnary):
    """ModelInfer of any Open Inference Protocol v2 server (the front door, a peer), raw tensor bytes."""

    method = MODEL_INFER

    def __init__(self, target: str, token: str | None, model: str, outputs: tuple[str, ...] = ()) -> None:
        super().__init__(target, token)
        self.model, self.outputs = model, outputs  # outputs: those asked for (all when empty)

    def payload(self, x: np.ndarray) -> bytes:
        return fd_client.request(self.model, x, self.outputs).SerializeToString()

    def check(self, answer: bytes, rows: int) -> None:
        check_infer_response(pb.ModelInferResponse.FromString(answer), rows)


class OipStream(_Grpc):
    """ModelStreamInfer (the front door's): one stream per worker, one request in flight on it at a time."""

    def __init__(self, target: str, token: str | None, model: str, outputs: tuple[str, ...] = ()) -> None:
        super().__init__(target, token)
        self.model, self.outputs = model, outputs
        self.calls: list[grpc.aio.StreamStreamCall] = []

    async def open(self, x: np.ndarray, concurrency: int) -> list[Send]:
        self._open_channels(concurrency)
        payload, rows = fd_client.request(self.model, x, self.outputs).SerializeToString(), len(x)
        self.calls = [self._channel(w).stream_stream(MODEL_STREAM_INFER)(metadata=self.metadata)
                      for w in range(concurrency)]

        def sender(call: grpc.aio.StreamStreamCall) -> Send:
            async def send() -> None:
                await call.write(payload)
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    raise AnswerError(f"the stream ended: {await call.code()}")
                response = pb.ModelStreamInferResponse.FromString(answer)
                if response.error_message:
                    raise AnswerError(response.error_message)
                check_infer_response(response.infer_response, rows)
            return send

        return [sender(call) for call in self.calls]

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self.calls = []
        await super().close()


class _Http(Target):
    """One keep-alive connection per worker (gradserve/http1.py), the request prepared once as bytes."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.connections: list[http1.Connection] = []

    def payload(self, x: np.ndarray) -> tuple[bytes, str]:
        raise NotImplementedError

    def check(self, answer: bytes, rows: int) -> None:
        raise NotImplementedError

    async def open(self, x: np.ndarray, concurrency: int) -> list[Send]:
        body, content_type = self.payload(x)
        request = http1.post_request(f"{self.host}:{self.port}", self.path, body, content_type, self.headers)
        self.connections = [http1.Connection(self.host, self.port) for _ in range(concurrency)]
        rows = len(x)

        def sender(connection: http1.Connection) -> Send:
            async def send() -> None:
                status, answer = await connection.send(request)
                if status != 200:
                    raise AnswerError(f"HTTP {status}: {answer[:200]!r}")
                self.check(answer, rows)
            return send

        return [sender(c) for c in self.connections]

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections = []


class TorchServeRest(_Http):
    """TorchServe's REST /predictions/<model>, the codec bytes as the HTTP body."""

    def __init__(self, base_url: str, token: str, model: str) -> None:
        super().__init__(f"{base_url}/predictions/{model}", token)

    def payload(self, x: np.ndarray) -> tuple[bytes, str]:
        return codec.encode({"input": x}), "application/octet-stream"

    def check(self, answer: bytes, rows: int) -> None:
        check_codec(answer, rows)


class OipRest(_Http):
    """/v2/models/<model>/infer of any Open Inference Protocol server (the front door, a peer), JSON both ways."""

    def __init__(self, base_url: str, token: str | None, model: str, outputs: tuple[str, ...] = ()) -> None:
        super().__init__(f"{base_url}/v2/models/{model}/infer", token)
        self.outputs = outputs

    def payload(self, x: np.ndarray) -> tuple[bytes, str]:
        # The bench's rows have few decimals (bench/models.py); rounded back from float32 they print short, as a
        # client's would.
        data = np.round(x.ravel().astype(np.float64), 7).tolist()
        body: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                            "data": data}]}
        if self.outputs:
            body["outputs"] = [{"name": name} for name in self.outputs]
        return json.dumps(body, separators=(",", ":")).encode(), "application/json"

    def check(self, answer: bytes, rows: int) -> None:
        # The first output's rows, without parsing the whole answer (every server here writes "shape" before
        # "data"); the status was 200.
        found = SHAPE.search(answer)
        if found is None or int(found.group(1)) != rows:
            raise AnswerError(f"expected {rows} rows, got {answer[:200]!r}")


SHAPE = re.compile(rb'"shape"\s*:\s*\[\s*(\d+)')


def check_codec(payload: bytes, rows: int) -> None:
    message = codec.decode(payload)
    if message.error is not None:
        raise AnswerError(f"{message.error.code}: {message.error.message}")
    if len(message.tensors["label"]) != rows:
        raise AnswerError(f"expected {rows} rows, got {len(message.tensors['label'])}")


def check_infer_response(response: pb.ModelInferResponse, rows: int) -> None:
    if not response.outputs or response.outputs[0].shape[0] != rows:
        raise AnswerError(f"expected {rows} rows, got outputs {[list(o.shape) for o in response.outputs]}")
