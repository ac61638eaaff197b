"""The one module that talks to TorchServe; the gRPC servicer and the REST app both call `Backend`.

It validates a request against the model's manifest, coalesces concurrent small requests, forwards the rows
to TorchServe's gRPC `Predictions` on loopback with the caller's remaining deadline and TorchServe's
inference key, and turns the handler's payload (tensors or an error) into outputs or a domain error.
Readiness is TorchServe's real state (the management API's worker status), polled in the background;
TorchServe's keys are renewed through its token endpoint before they expire.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import httpx
import numpy as np

from handlers import codec
from server import errors
from server.coalescer import Coalescer, Outputs
from server.config import ServeConfig
from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, Unavailable
from server.generated import torchserve_pb2, torchserve_pb2_grpc
from server.models import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where a running TorchServe listens, and the key file it wrote."""

    grpc_target: str  # "127.0.0.1:<grpc inference port>"
    management_url: str  # "http://127.0.0.1:<management port>"
    key_file: Path


@dataclass(frozen=True)
class Keys:
    inference: str
    management: str
    api: str
    expires: float  # time.time() at which the first of the inference and management keys expires

    @classmethod
    def read(cls, path: Path) -> Keys:
        data = json.loads(path.read_text())
        expiry = min(_timestamp(data[k]["expiration time"]) for k in ("inference", "management"))
        return cls(data["inference"]["key"], data["management"]["key"], data["API"]["key"], expiry)


def _timestamp(text: str) -> float:
    """TorchServe writes nanoseconds ("...T12:00:38.151610066Z"); Python parses at most microseconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00").timestamp()


class Backend:
    def __init__(self, config: ServeConfig, registry: Mapping[str, ModelInfo],
                 observe_group: Callable[[str, int], None] | None = None) -> None:
        self._config = config
        self._registry = dict(registry)
        self._observe_group = observe_group or (lambda model, rows: None)
        self._endpoint: Endpoint | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: torchserve_pb2_grpc.InferenceAPIsServiceStub | None = None
        self._http: httpx.AsyncClient | None = None
        self._keys: Keys | None = None
        self._ready: dict[str, bool] = {}
        self._unknown_polls: dict[str, int] = dict.fromkeys(self._registry, 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._draining = False
        self._coalescers = {
            name: Coalescer(functools.partial(self._predict, info), config.coalesce_max_rows,
                            config.coalesce_max_delay_ms / 1000, config.coalesce_max_calls,
                            lambda rows, name=name: self._observe_group(name, rows))
            for name, info in self._registry.items()
        }
        self.on_ready_change: Callable[[bool], None] = lambda ready: None

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, ModelInfo]:
        return dict(self._registry)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def ready(self) -> bool:
        serving = bool(self._registry) and all(self._ready.get(name, False) for name in self._registry)
        return serving and not self._draining

    def model(self, name: str, version: str = "") -> ModelInfo:
        info = self._registry.get(name)
        if info is None:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {sorted(self._registry)}")
        if version and version != info.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it serves version {info.version!r}")
        return info

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return not self._draining and self._ready.get(name, False)

    def drain(self) -> None:
        """Shutting down: report not ready and refuse new requests; accepted ones still finish."""
        was_ready = self.ready()
        self._draining = True
        if was_ready:
            self.on_ready_change(False)

    # --- connection to TorchServe -------------------------------------------------------------------------

    async def connect(self, endpoint: Endpoint) -> None:
        """Use a (re)started TorchServe: new channel, fresh keys, readiness polling and key renewal."""
        await self.disconnect()
        self._endpoint = endpoint
        await self._reload_keys()
        options = [("grpc.max_send_message_length", self._config.max_message_bytes + 4096),
                   ("grpc.max_receive_message_length", self._config.max_message_bytes + 4096)]
        self._channel = grpc.aio.insecure_channel(endpoint.grpc_target, options=options)
        self._stub = torchserve_pb2_grpc.InferenceAPIsServiceStub(self._channel)
        self._http = httpx.AsyncClient(base_url=endpoint.management_url, timeout=5.0)
        await self.poll_ready()
        self._tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._renew_loop())]

    async def disconnect(self) -> None:
        """TorchServe is gone (or going): not ready until the next `connect`."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._set_ready({})
        # Let go first: a call started while the channel closes would find it closed (UsageError).
        channel, http = self._channel, self._http
        self._channel = self._stub = self._http = self._endpoint = None
        if channel is not None:
            await channel.close()  # cancels the calls in flight: `_predict` answers them UNAVAILABLE
        if http is not None:
            await http.aclose()

    async def poll_ready(self) -> None:
        """Ask TorchServe's management API which models have a READY worker. A poll that gets no answer
        (TorchServe busy or restarting its management key) keeps the last state; `unknown_polls_max` such
        polls in a row mean not ready. A process that exits is the supervisor's to notice, at once."""
        states = {}
        for name in self._registry:
            answer = await self._model_has_ready_worker(name)
            if answer is None:
                self._unknown_polls[name] += 1
                answer = self._ready.get(name, False) and self._unknown_polls[name] < self._config.unknown_polls_max
            else:
                self._unknown_polls[name] = 0
            states[name] = answer
        self._set_ready(states)

    async def _model_has_ready_worker(self, name: str) -> bool | None:
        """Whether TorchServe reports a READY worker for `name`; None when it did not say."""
        for _ in range(2):
            keys = self._keys
            if self._http is None or keys is None:
                return None
            try:
                response = await self._http.get(f"/models/{name}", headers=self._auth(keys.management))
                if response.status_code in (400, 401, 403) and "Token Authorization" in response.text:
                    # Its management key was renewed under this call: follow the key file, then ask again.
                    await self._reload_keys(stale=keys.management, kind="management")
                    continue
                if response.status_code != 200:
                    return False
                return any(w.get("status") == "READY" for entry in response.json() for w in entry.get("workers", []))
            except (httpx.HTTPError, ValueError, Unavailable):
                return None
        return None

    def _set_ready(self, states: dict[str, bool]) -> None:
        before = self.ready()
        self._ready = states
        if self.ready() != before:
            log.info("backend %s", "ready" if self.ready() else "not ready")
            self.on_ready_change(self.ready())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.ready_poll_s)
            await self.poll_ready()

    async def _renew_loop(self) -> None:
        while True:
            assert self._keys is not None
            # Renew a margin before expiry: a third of the keys' lifetime when that is shorter.
            margin = min(self._config.token_renew_margin_s, self._config.token_expiration_min * 60 / 3)
            wait = self._keys.expires - time.time() - margin
            await asyncio.sleep(max(wait, 0.5))
            try:
                await self.renew_keys()
            except (httpx.HTTPError, OSError, ValueError, KeyError, Unavailable) as e:
                log.warning("renewing TorchServe's keys failed (%s); retrying", e)

    async def renew_keys(self) -> None:
        """Have TorchServe issue new inference and management keys, and read them from its key file."""
        assert self._http is not None and self._keys is not None and self._endpoint is not None
        old = self._keys
        for kind in ("inference", "management"):
            response = await self._http.get("/token", params={"type": kind}, headers=self._auth(old.api))
            response.raise_for_status()
        await self._reload_keys(stale=old.management, kind="management")  # the last one it renewed
        log.info("renewed TorchServe's keys; they expire in %.0f s", self._keys.expires - time.time())

    async def _reload_keys(self, stale: str | None = None, kind: str = "inference") -> None:
        """Read TorchServe's key file, which it rewrites in place (a reader can catch it half-written); with
        `stale`, wait until the file holds a `kind` ("inference" or "management") key other than that one."""
        assert self._endpoint is not None
        for _ in range(40):
            try:
                keys = Keys.read(self._endpoint.key_file)
                if stale is None or getattr(keys, kind) != stale:
                    self._keys = keys
                    return
            except (OSError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.05)
        raise Unavailable("the model server's keys are being renewed; retry shortly")

    @staticmethod
    def _auth(key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async def close(self) -> None:
        await self.disconnect()

    # --- inference -----------------------------------------------------------------------------------------

    async def infer(self, name: str, version: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] = (), timeout: float | None = None) -> tuple[ModelInfo, Outputs]:
        """The requested outputs (all when empty) for `inputs`, within `timeout` seconds (the caller's
        remaining deadline; the configured default when None)."""
        info = self.model(name, version)
        rows = self._validate(info, inputs)
        wanted = self._requested(info, outputs)
        if self._draining:  # accepted requests still finish; new ones go elsewhere
            raise Unavailable("the server is shutting down; retry (another replica will answer)")
        if not self._ready.get(name, False):  # TorchServe's state
            raise Unavailable(f"model {name!r} is not ready (TorchServe is starting or restarting); retry shortly")
        if self._in_flight >= self._config.max_in_flight:
            raise Overloaded(f"the server has {self._in_flight} requests in flight; retry with backoff")
        timeout = self._config.default_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            async with asyncio.timeout(timeout):
                result = await self._coalescers[name].submit(rows, loop.time() + timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline of {timeout:.3f} s") from None
        finally:
            self._in_flight -= 1
        return info, {k: result[k] for k in wanted}

    def _validate(self, info: ModelInfo, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        spec = info.input
        max_rows = min(info.max_rows, self._config.max_rows)
        row_shape = spec.shape[1:]
        expected = (f"one {spec.datatype} input {spec.name!r} of shape [n, {', '.join(map(str, row_shape))}] "
                    f"with 1 <= n <= {max_rows} and finite values")
        if set(inputs) != {spec.name}:
            raise InvalidInput(f"model {info.name!r} takes {expected}; got inputs {sorted(inputs)}")
        x = inputs[spec.name]
        if x.dtype != codec.dtype_of(spec.datatype) or tuple(x.shape[1:]) != row_shape or x.ndim != len(spec.shape):
            raise InvalidInput(f"model {info.name!r} takes {expected}; got {_datatype(x)} {list(x.shape)}")
        if not 1 <= len(x) <= max_rows:
            raise InvalidInput(f"model {info.name!r} takes {expected}; got n = {len(x)}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InvalidInput(f"model {info.name!r} takes {expected}; got NaN or infinite values")
        return x

    @staticmethod
    def _requested(info: ModelInfo, outputs: Sequence[str]) -> list[str]:
        known = [o.name for o in info.outputs]
        unknown = sorted(set(outputs) - set(known))
        if unknown:
            raise InvalidInput(f"model {info.name!r} has no output(s) {unknown}; it has {known}")
        return list(outputs) or known

    async def _predict(self, info: ModelInfo, rows: np.ndarray, deadline: float) -> Outputs:
        request = torchserve_pb2.PredictionsRequest(
            model_name=info.name, input={"data": codec.encode({info.input.name: rows})})
        for _ in range(3):
            stub, keys = self._stub, self._keys
            if stub is None or keys is None:
                raise Unavailable("the model server is down and restarting; retry shortly")
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise DeadlineExceeded("the deadline passed before the request reached the model server")
            try:
                response = await stub.Predictions(request, timeout=timeout,
                                                  metadata=(("authorization", f"Bearer {keys.inference}"),))
                break
            except (asyncio.CancelledError, grpc.aio.UsageError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task itself is cancelled (its caller's deadline): not ours to answer
                # TorchServe died and `disconnect` closed the channel under this call, which grpc.aio reports
                # as a cancellation of the awaiting task; passed on, the caller's RPC would get no answer.
                raise Unavailable("the model server went down during the call; retry shortly") from None
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.PERMISSION_DENIED or self._endpoint is None:
                    raise _backend_error(e) from None
                # TorchServe renewed its keys under this call (it drops the old key before it has rewritten
                # its key file): wait for the new key, then try again.
                await self._reload_keys(stale=keys.inference)
        else:
            raise Unavailable("the model server refused its renewed key; retry shortly")
        try:
            message = codec.decode(response.prediction)
        except codec.CodecError as e:
            raise RuntimeError(f"model server sent an undecodable payload: {e}") from None
        if message.error is not None:
            raise errors.from_wire(message.error)
        return message.tensors


def _backend_error(e: grpc.aio.AioRpcError) -> Exception:
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the model server did not answer within the deadline")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable("the model server is unreachable; retry shortly")
    worker_died = code == grpc.StatusCode.INTERNAL and (e.details() or "").startswith("Worker died")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or worker_died:
        # TorchServe's answer to the requests a dead worker held, while it restarts the worker: 507
        # (RESOURCE_EXHAUSTED) when it has already seen the exit code 137 of a SIGKILL (the OOM killer's),
        # else 500 "Worker died." (INTERNAL), a race in its WorkerThread. (A full TorchServe queue is
        # UNAVAILABLE, and requests never exceed its max_request_size.)
        return Unavailable("the model server lost its worker and is restarting it; retry shortly")
    return RuntimeError(f"model server call failed: {code.name}: {e.details()}")


def _datatype(x: np.ndarray) -> str:
    try:
        return codec.datatype_of(x.dtype)
    except codec.CodecError:
        return str(x.dtype)
