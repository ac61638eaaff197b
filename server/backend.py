"""The front door's data plane: the gRPC servicer and the REST app both call `Backend`.

It finds the version a request names (or the model's default: server/lifecycle.py), validates the request
against its manifest (handlers/manifest.py, the same check the handler makes), admits it within the in-flight
limit, coalesces concurrent small requests (server/coalescer.py), hands the rows to the model server with the
caller's remaining deadline, and turns the handler's payload (tensors or an error) into outputs or a domain
error (server/errors.py). The model server is TorchServe's client (server/torchserve/client.py); unit tests give
a fake.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from handlers import codec
from handlers.manifest import InvalidRows, Manifest, validate_rows
from handlers.sharedmem import PayloadArea
from server import errors, metrics, oip
from server.client_shm import Regions
from server.coalescer import Coalescer, Outputs
from server.config import ServeConfig
from server.errors import DeadlineExceeded, InvalidInput, Overloaded, Unavailable
from server.lifecycle import ModelManager, Version
from server.models import version_key

log = logging.getLogger(__name__)

JSON_VALUE_BYTES = 32  # a number written as JSON text, with its separator, at most (e.g. -1.2345678901234567e-300,)


class ModelServer(Protocol):
    """What the data plane needs of TorchServe (server/torchserve/client.py's TorchServeClient)."""

    async def predict(self, model: str, payload: bytes, deadline: float) -> bytes: ...


class Backend:
    def __init__(self, config: ServeConfig, models: ModelManager, server: ModelServer,
                 observe_group: Callable[[str, int], None] | None = None,
                 payloads: PayloadArea | None = None, shared_regions: Path | None = None) -> None:
        self._config = config
        self._models = models
        self._server = server
        self._payloads = payloads  # large requests go to the handler through shared memory (None: all inline)
        # Clients' shared memory their inputs may be read from (server/client_shm.py); `shared_regions`: the
        # registrations' folder when several front-door processes share the port (server/doors.py).
        self.regions = Regions(max_read_bytes=config.limits.max_message_bytes, shared=shared_regions)
        self._observe = observe_group or (lambda model, rows: None)
        self._in_flight = 0
        self._draining = False
        self._was_ready = False
        self._listeners: list[Callable[[bool], None]] = []
        # One coalescer per loaded build and input: the rows of one call to TorchServe are all of one input.
        self._coalescers: dict[tuple[str, str], Coalescer] = {}
        models.add_listener(self._readiness_changed)

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def models(self) -> ModelManager:
        return self._models

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def ready(self) -> bool:
        """The models are served (ModelManager.serving), and not shutting down."""
        return self._models.serving() and not self._draining

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(ready)` runs whenever `ready()` changes (health, metrics)."""
        self._listeners.append(listener)

    def _readiness_changed(self) -> None:
        live = {loaded.internal for name in self._models.names for loaded in self._models.versions(name).values()}
        for key in [key for key in self._coalescers if key[0] not in live]:
            del self._coalescers[key]  # an unloaded build: nothing is queued (it drained before it went)
        now = self.ready()
        if now != self._was_ready:
            self._was_ready = now
            log.info("backend %s", "ready" if now else "not ready")
            for listener in self._listeners:
                listener(now)

    def model(self, name: str, version: str = "") -> Manifest:
        """The manifest of the version a request names (or the default); Unavailable for one that failed."""
        loaded = self._models.resolve(name, version)
        if loaded.archive.manifest is None:
            raise Unavailable(f"model {name!r} cannot be served: {loaded.reason}")
        return loaded.manifest

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """ModelMetadata as the protocol's JSON: the version's inputs and outputs, every version of the model,
        the default, and each version's state (and a failed one's reason) among the parameters."""
        loaded = self._models.resolve(name, version)
        versions = self._models.versions(name)
        listed = sorted((v for v, lv in versions.items() if lv.state != "draining"), key=version_key)
        extra: dict[str, str | int | float | bool] = {"default_version": self._models.default(name),
                                                      "state": self._state(loaded)}
        for v in listed:
            extra[f"versions.{v}.state"] = self._state(versions[v])
            if versions[v].reason:
                extra[f"versions.{v}.reason"] = versions[v].reason
        if loaded.reason:
            extra["reason"] = loaded.reason
        return oip.model_metadata(name, loaded.archive.manifest, listed, extra)

    def _state(self, loaded: Version) -> str:
        return "ready" if self._models.ready(loaded) else "loading" if loaded.state == "ready" else loaded.state

    def model_ready(self, name: str, version: str = "") -> bool:
        return not self._draining and self._models.ready(self._models.resolve(name, version))

    def why_not_ready(self, name: str, version: str = "") -> str:
        loaded = self._models.resolve(name, version)
        return loaded.reason or ("" if self._models.ready(loaded) else self._state(loaded))

    def body_limit(self, name: str, version: str, binary: bool) -> int | None:
        """The most bytes an inference request for this model can need: its max_rows rows, each value as JSON
        text or raw bytes, and the envelope; for a model that takes image files, at least
        limits.image_request_bytes (files have no size a shape could bound). None for an unknown model (the
        route answers that)."""
        try:
            manifest = self.model(name, version)
        except errors.ServeError:
            return None
        limits = self._config.limits
        rows = min(manifest.max_rows, limits.max_rows)
        tensors = [s for s in manifest.inputs if s.datatype != "BYTES"]
        per_value = {s.name: codec.dtype_of(s.datatype).itemsize if binary else JSON_VALUE_BYTES for s in tensors}
        needed = max((rows * math.prod(s.row_shape) * per_value[s.name] for s in tensors), default=0)
        if len(tensors) < len(manifest.inputs):
            needed = max(needed, limits.image_request_bytes)
        return needed + limits.envelope_bytes

    def drain(self) -> None:
        """Shutting down: report not ready and refuse new requests; accepted ones still finish."""
        self._draining = True
        self._readiness_changed()

    def close(self) -> None:
        """Stopped: remove the shared-memory payload directory, let go of the clients' regions."""
        if self._payloads is not None:
            self._payloads.close()
        self.regions.close()

    # --- inference -----------------------------------------------------------------------------------------

    async def infer(self, name: str, version: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] = (), timeout: float | None = None) -> tuple[Manifest, Outputs]:
        """The requested outputs (all when empty) for `inputs`, within `timeout` seconds (the caller's
        remaining deadline; the configured default when None)."""
        if self._draining:  # accepted requests still finish; new ones go elsewhere
            raise Unavailable("the server is shutting down; retry (another replica will answer)")
        manifest = self.model(name, version)
        try:
            input_name, rows = validate_rows(manifest, inputs, self._config.limits.max_rows)
        except InvalidRows as e:
            raise InvalidInput(str(e)) from None
        wanted = _requested(manifest, outputs)
        loaded = self._models.route(name, version)
        if self._in_flight >= self._config.limits.max_in_flight:
            raise Overloaded(f"the server has {self._in_flight} requests in flight; retry with backoff")
        timeout = self._config.limits.default_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            with self._models.in_flight(loaded):
                async with asyncio.timeout(timeout):
                    result = await self._coalescer(loaded, input_name).submit(rows, loop.time() + timeout,
                                                                              frozenset(wanted))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline of {timeout:.3f} s") from None
        finally:
            self._in_flight -= 1
            metrics.IN_FLIGHT.dec()
        return loaded.manifest, {k: result[k] for k in wanted}

    def _coalescer(self, loaded: Version, input_name: str) -> Coalescer:
        key = (loaded.internal, input_name)
        if key not in self._coalescers:
            c = self._config.coalesce
            self._coalescers[key] = Coalescer(
                functools.partial(self._predict, loaded, input_name), c.max_rows, c.max_delay_ms / 1000,
                c.max_calls, functools.partial(self._observe, loaded.archive.name))
        return self._coalescers[key]

    async def _predict(self, loaded: Version, input_name: str, rows: np.ndarray, deadline: float,
                       outputs: frozenset[str]) -> Outputs:
        """The handler's outputs for `rows`: those of `outputs` (empty: all) from a handler that reads the request's
        wanted outputs, all of them from an older one."""
        parts = codec.encode_parts({input_name: rows}, sorted(outputs) if outputs else None)
        placed = None
        if (self._payloads is not None and loaded.manifest.payload_refs
                and sum(memoryview(p).nbytes for p in parts) >= self._payloads.min_bytes):
            placed = self._payloads.write(parts)  # None when it could not be: then inline
        metrics.backend_calls("shared_memory" if placed else "inline").inc()
        try:
            payload = codec.encode_ref(*placed) if placed else b"".join(parts)
            answer = await self._server.predict(loaded.internal, payload, deadline)
        finally:
            if placed and self._payloads is not None:
                self._payloads.release(*placed)  # kept for the next payload of its size, or removed
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
