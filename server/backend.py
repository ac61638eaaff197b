"""The front door's data plane: the gRPC servicer and the REST app both call `Backend`.

It validates a request against the model's manifest (handlers/manifest.py, the same check the handler makes),
admits it within the in-flight limit, coalesces concurrent small requests (server/coalescer.py), hands the rows
to the model server with the caller's remaining deadline, and turns the handler's payload (tensors or an error)
into outputs or a domain error (server/errors.py). The model server is TorchServe's client
(server/torchserve/client.py), given to the constructor; unit tests give a fake.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from handlers import codec
from handlers.manifest import InvalidRows, Manifest, validate_rows
from server import errors
from server.coalescer import Coalescer, Outputs
from server.config import ServeConfig
from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, Unavailable
from server.models import ServedModel

log = logging.getLogger(__name__)


class ModelServer(Protocol):
    """What the data plane needs of TorchServe (server/torchserve/client.py's TorchServeClient)."""

    def ready(self, model: str) -> bool: ...

    def add_listener(self, listener: Callable[[], None]) -> None: ...

    async def predict(self, model: str, payload: bytes, deadline: float) -> bytes: ...


class Backend:
    def __init__(self, config: ServeConfig, registry: Mapping[str, ServedModel], server: ModelServer,
                 observe_group: Callable[[str, int], None] | None = None) -> None:
        self._config = config
        self._registry = dict(registry)
        self._server = server
        self._in_flight = 0
        self._draining = False
        self._was_ready = False
        self._listeners: list[Callable[[bool], None]] = []
        observe = observe_group or (lambda model, rows: None)
        c = config.coalesce
        # One coalescer per model and input: the rows of one call to TorchServe are all of one input.
        self._coalescers = {
            (name, spec.name): Coalescer(functools.partial(self._predict, served.manifest, spec.name), c.max_rows,
                                         c.max_delay_ms / 1000, c.max_calls, functools.partial(observe, name))
            for name, served in self._registry.items() for spec in served.manifest.inputs
        }
        server.add_listener(self._readiness_changed)

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, ServedModel]:
        return dict(self._registry)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def ready(self) -> bool:
        """Every model served, and not shutting down."""
        serving = bool(self._registry) and all(self._server.ready(name) for name in self._registry)
        return serving and not self._draining

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` runs whenever `ready()` changes (health, metrics)."""
        self._listeners.append(listener)

    def _readiness_changed(self) -> None:
        now = self.ready()
        if now != self._was_ready:
            self._was_ready = now
            log.info("backend %s", "ready" if now else "not ready")
            for listener in self._listeners:
                listener(now)

    def model(self, name: str, version: str = "") -> Manifest:
        served = self._registry.get(name)
        if served is None:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {sorted(self._registry)}")
        if version and version != served.manifest.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; "
                                f"it serves version {served.manifest.version!r}")
        return served.manifest

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return not self._draining and self._server.ready(name)

    def drain(self) -> None:
        """Shutting down: report not ready and refuse new requests; accepted ones still finish."""
        self._draining = True
        self._readiness_changed()

    # --- inference -----------------------------------------------------------------------------------------

    async def infer(self, name: str, version: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] = (), timeout: float | None = None) -> tuple[Manifest, Outputs]:
        """The requested outputs (all when empty) for `inputs`, within `timeout` seconds (the caller's
        remaining deadline; the configured default when None)."""
        manifest = self.model(name, version)
        try:
            input_name, rows = validate_rows(manifest, inputs, self._config.limits.max_rows)
        except InvalidRows as e:
            raise InvalidInput(str(e)) from None
        wanted = _requested(manifest, outputs)
        if self._draining:  # accepted requests still finish; new ones go elsewhere
            raise Unavailable("the server is shutting down; retry (another replica will answer)")
        if not self._server.ready(name):  # TorchServe's state
            raise Unavailable(f"model {name!r} is not ready (TorchServe is starting or restarting); retry shortly")
        if self._in_flight >= self._config.limits.max_in_flight:
            raise Overloaded(f"the server has {self._in_flight} requests in flight; retry with backoff")
        timeout = self._config.limits.default_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            async with asyncio.timeout(timeout):
                result = await self._coalescers[name, input_name].submit(rows, loop.time() + timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline of {timeout:.3f} s") from None
        finally:
            self._in_flight -= 1
        return manifest, {k: result[k] for k in wanted}

    async def _predict(self, manifest: Manifest, input_name: str, rows: np.ndarray, deadline: float) -> Outputs:
        answer = await self._server.predict(manifest.name, codec.encode({input_name: rows}), deadline)
        try:
            message = codec.decode(answer)
        except codec.CodecError as e:
            raise RuntimeError(f"model server sent an undecodable payload: {e}") from None
        if message.error is not None:
            raise errors.from_wire(message.error)
        return message.tensors


def _requested(manifest: Manifest, outputs: Sequence[str]) -> list[str]:
    known = manifest.output_names()
    unknown = sorted(set(outputs) - set(known))
    if unknown:
        raise InvalidInput(f"model {manifest.name!r} has no output(s) {unknown}; it has {known}")
    return list(outputs) or known
