"""The one client of TorchServe's own API, and the one place that knows TorchServe's words.

`TorchServeClient` holds TorchServe's keys (read from the key file it writes, renewed through its token
endpoint before they expire), keep-alive connections to its HTTP inference API (`POST /predictions/<model>`
through gradserve/http1.py: a call through its gRPC `Predictions` cost TorchServe's JVM about twice the CPU, and
grpc.aio the front door several times as much), and each model's readiness (its management API's worker status,
polled in the background). The supervisor calls `start` once a TorchServe process runs and `stop` when it has
died; the front door's data plane (server/backend.py) calls `predict` and `ready` and is told when readiness
changes.

TorchServe answers some conditions only in prose (a management key it has just replaced, a worker that died
under a request, a worker that keeps failing to load): every match on its text is in the section below, so a
TorchServe upgrade that rewords one is fixed here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from gradserve import http1
from server.config import TorchServeSection
from server.errors import DeadlineExceeded, Unavailable
from server.torchserve.process import Endpoint, TorchServe, TorchServeError

log = logging.getLogger(__name__)

# --- TorchServe's words -------------------------------------------------------------------------------------------

# The management API's 400 for a request sent with a key it has just replaced.
_STALE_KEY = "Token Authorization"
# The 500's text for the requests a worker held when it died, if TorchServe's WorkerThread has not yet read its
# exit code (once it has, the same requests get 507).
_WORKER_DIED = "Worker died"
# /ping's answer once the frontend serves.
_HEALTHY = "Healthy"
# ts_log.log: a model's worker died and is being restarted (the thread is W-<port>-<model>_<version>).
_RETRY_WORKER = re.compile(r" W-\d+-(.+?)_[^ _]+ \S+ - Retry worker")
# model_log.log: the worker's own account of why a model did not load.
_LOAD_FAILED = "Failed to load model {name}, exception (.*)"
_PYTHON_ERROR = re.compile(r"MODEL_LOG - ((?:\w+\.)*\w*(?:Error|Exception): .*)")


def stale_key(status: int, text: str) -> bool:
    return status in (400, 401, 403) and _STALE_KEY in text


def load_failures(ts_log: str, model_names: Sequence[str]) -> dict[str, int]:
    """How often each model's worker died and was retried, from TorchServe's log."""
    retried = _RETRY_WORKER.findall(ts_log)
    return {name: retried.count(name) for name in model_names}


def load_error(model_log: str, model_name: str) -> str:
    """The worker's last word on why `model_name` did not load ("" if it said none)."""
    said = re.findall(_LOAD_FAILED.format(name=re.escape(model_name)), model_log) or _PYTHON_ERROR.findall(model_log)
    return said[-1].strip() if said else ""


def backend_error(status: int, text: str) -> Exception:
    """The domain error (server/errors.py) for a prediction TorchServe answered with HTTP `status`."""
    if status in (408, 504):
        return DeadlineExceeded("the model server did not answer within the deadline")
    if status in (500, 507) and (status == 507 or _WORKER_DIED in text):
        # What TorchServe answers the requests a dead worker held while it restarts the worker: 507 when it has
        # already seen the exit code 137 of a SIGKILL (the OOM killer's), else 500 "Worker died." (a race in its
        # WorkerThread). Requests never exceed its max_request_size.
        return Unavailable("the model server lost its worker and is restarting it; retry shortly")
    if status in (404, 503):  # the model is not (or no longer) registered; its queue is full; no worker yet
        return Unavailable(f"the model server cannot take the request now ({status}: {text.strip()[:200]}); "
                           "retry shortly")
    return RuntimeError(f"model server call failed: HTTP {status}: {text.strip()[:200]}")


# --- keys ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    inference: str
    management: str
    api: str
    expires: float  # time.time() at which the first of the inference and management keys expires

    @classmethod
    def read(cls, path: Path) -> Keys:
        """TorchServe's key_file.json (it rewrites it in place: a reader may catch it half-written)."""
        data = json.loads(path.read_text())
        expiry = min(_timestamp(data[k]["expiration time"]) for k in ("inference", "management"))
        return cls(data["inference"]["key"], data["management"]["key"], data["API"]["key"], expiry)


def _timestamp(text: str) -> float:
    """TorchServe writes nanoseconds ("...T12:00:38.151610066Z"); Python parses at most microseconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00").timestamp()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# --- the client ----------------------------------------------------------------------------------------------

POLL_TIMEOUT_S = 5.0  # a readiness poll TorchServe has not answered by then counts as unanswered


class LoadFailed(Exception):
    """A model did not load in TorchServe; the message says why, in the worker's own words where it gave any."""


class TorchServeClient:
    def __init__(self, settings: TorchServeSection | None = None) -> None:
        self.settings = settings or TorchServeSection()
        self._endpoint: Endpoint | None = None
        self._models: list[str] = []
        self._inference: http1.Pool | None = None
        self._management: http1.Pool | None = None  # the readiness poll's keep-alive connection
        self._http: httpx.AsyncClient | None = None  # the rarer management calls
        self._keys: Keys | None = None
        self._ready: dict[str, bool] = {}
        self._unknown_polls: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, torchserve: TorchServe, timeout: float | None = None) -> None:
        """Wait until the started `torchserve` serves every model it loads, then use it: channel, keys,
        readiness polling and key renewal. Raises TorchServeError (saying why) when it does not come up."""
        await self.stop()
        await self.connect(torchserve.endpoint, torchserve.model_names)
        try:
            await self._wait_ready(torchserve, self.settings.ready_timeout_s if timeout is None else timeout)
        except BaseException:
            await self.stop()
            raise
        await self.poll_ready()
        self._tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._renew_loop())]

    async def connect(self, endpoint: Endpoint, models: Sequence[str]) -> None:
        """The connections to `endpoint`; keys are read once TorchServe has written them."""
        self._endpoint, self._models = endpoint, list(models)
        self._unknown_polls = dict.fromkeys(self._models, 0)
        self._inference = http1.Pool.to(endpoint.inference_url)
        self._management = http1.Pool.to(endpoint.management_url, max_idle=1)
        self._http = httpx.AsyncClient(base_url=endpoint.management_url, timeout=5.0)

    async def stop(self) -> None:
        """TorchServe is gone (or going): every model not ready until the next `start`."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._set_ready({})
        inference, management, http = self._inference, self._management, self._http
        self._inference = self._management = self._http = self._endpoint = None
        self._keys = None
        if inference is not None:
            inference.close()  # ends the calls in flight: `predict` answers them UNAVAILABLE
        if management is not None:
            management.close()
        if http is not None:
            await http.aclose()

    async def follow(self, state: Mapping[str, Any]) -> None:
        """Another front-door process runs TorchServe (server/doors.py): send predictions where its `shared()`
        state says TorchServe listens, with the keys from its key file, and take its word on readiness."""
        shared = state["endpoint"]
        endpoint = shared and Endpoint(**{**shared, "key_file": Path(shared["key_file"])})
        if endpoint != self._endpoint:
            await self.stop()
            if endpoint is not None:
                await self.connect(endpoint, list(state["ready"]))
        if endpoint is not None and self._keys is None:
            await self._read_keys_once()  # written once TorchServe is up: by the time it reports a model ready
        self._set_ready(dict(state["ready"]) if endpoint is not None else {})

    def shared(self) -> dict[str, Any]:
        """Where TorchServe listens and which models it serves, for `follow` in another process (JSON)."""
        endpoint = self._endpoint
        return {"endpoint": endpoint and {**dataclasses.asdict(endpoint), "key_file": str(endpoint.key_file)},
                "ready": dict(self._ready)}

    # --- readiness -----------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """`listener()` runs whenever a model's readiness changes."""
        self._listeners.append(listener)

    def ready(self, model: str) -> bool:
        return self._ready.get(model, False)

    async def poll_ready(self) -> None:
        """Ask the management API which models have a READY worker. A poll that gets no answer (TorchServe busy
        or renewing its management key) keeps the last state; `unknown_polls_max` such polls in a row mean not
        ready. A process that exits is the supervisor's to notice, at once."""
        states = {}
        for name in self._models:
            answer = await self._has_ready_worker(name)
            if answer is None:
                self._unknown_polls[name] += 1
                answer = self._ready.get(name, False) and self._unknown_polls[name] < self.settings.unknown_polls_max
            else:
                self._unknown_polls[name] = 0
            states[name] = answer
        self._set_ready(states)

    async def _has_ready_worker(self, name: str) -> bool | None:
        """Whether TorchServe reports a READY worker for `name`; None when it did not say. Asked every
        `ready_poll_s` over a kept-alive connection (through httpx a poll cost the front door 2-3 ms of CPU)."""
        for _ in range(2):
            keys = self._keys or await self._read_keys_once()
            pool = self._management
            if pool is None or keys is None:
                return None
            head = http1.request_head("GET", pool.authority, f"/models/{quote(name, safe='')}", 0,
                                      headers=_bearer(keys.management))
            try:
                async with asyncio.timeout(POLL_TIMEOUT_S):
                    status, answer = await pool.send(head)
                text = answer.decode(errors="replace")
                if stale_key(status, text):
                    # Its management key was renewed under this call: follow the key file, then ask again.
                    await self._reload_keys(stale=keys.management, kind="management")
                    continue
                if status != 200:
                    return False
                return any(w.get("status") == "READY" for entry in json.loads(text) for w in entry.get("workers", []))
            except (TimeoutError, OSError, asyncio.IncompleteReadError, http1.HttpError, ValueError, Unavailable):
                return None
        return None

    def _set_ready(self, states: dict[str, bool]) -> None:
        changed = states != self._ready
        self._ready = states
        if changed:
            for listener in self._listeners:
                listener()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ready_poll_s)
            await self.poll_ready()

    async def _wait_ready(self, torchserve: TorchServe, timeout: float) -> None:
        """Until TorchServe answers Ping as Healthy and every model has a READY worker; fails early, with the
        worker's own words, when a model's worker keeps dying while it loads (waiting would not help)."""
        deadline = time.monotonic() + timeout
        problem = "not started"
        while time.monotonic() < deadline:
            if not torchserve.alive:
                raise TorchServeError(f"TorchServe exited (code {torchserve.returncode}); last lines of "
                                      f"{torchserve.log_path}:\n{torchserve.log_tail()}")
            problem = await self._not_ready()
            if problem is None:
                return
            self._check_loads(torchserve)
            await asyncio.sleep(0.25)
        raise TorchServeError(f"TorchServe not ready after {timeout:.0f}s ({problem}); last lines of "
                              f"{torchserve.model_log_path}:\n{torchserve.log_tail(15, torchserve.model_log_path)}")

    async def _not_ready(self) -> str | None:
        """None when ready, else what is still missing."""
        keys = self._keys or await self._read_keys_once()
        if keys is None or self._inference is None:
            return "key_file.json not written yet"
        pool = self._inference
        try:
            async with asyncio.timeout(2):
                status, answer = await pool.send(http1.request_head("GET", pool.authority, "/ping", 0,
                                                                      headers=_bearer(keys.inference)))
        except (OSError, asyncio.IncompleteReadError, http1.HttpError) as e:
            return f"/ping failed: {type(e).__name__}"
        if status != 200 or _HEALTHY.encode() not in answer:
            return f"/ping says {status} {answer.decode(errors='replace').strip()[:200]}"
        for name in self._models:
            if not await self._has_ready_worker(name):
                return f"model {name} has no READY worker yet"
        return None

    def _check_loads(self, torchserve: TorchServe, names: Sequence[str] | None = None,
                     before: dict[str, int] | None = None) -> None:
        """Fail (TorchServeError) when a model's worker has died while loading `max_load_failures` times since
        this start (or since `before`, the counts at its registration)."""
        ts_log = torchserve.log_since_start(torchserve.ts_log_path)
        for name, failures in load_failures(ts_log, self._models if names is None else names).items():
            failures -= (before or {}).get(name, 0)
            if failures >= self.settings.max_load_failures:
                reason = load_error(torchserve.log_since_start(torchserve.model_log_path), name)
                raise TorchServeError(
                    f"model {name!r}: its worker failed to load {failures} times (TorchServe keeps retrying): "
                    f"{reason or 'it gave no reason'}. Fix or remove its archive; the worker's log "
                    f"is {torchserve.model_log_path}")

    # --- models loaded at run time ---------------------------------------------------------------------

    async def register(self, torchserve: TorchServe, archive: str, name: str, workers: int = 1,
                       timeout: float | None = None) -> None:
        """Load the archive `archive` (a file in TorchServe's model store) as model `name`, and wait until a
        worker serves it (its handler has initialised: the model is loaded and warmed up). LoadFailed, after
        unloading what TorchServe kept retrying, when it does not come up."""
        keys = self._keys
        if self._http is None or keys is None:
            raise LoadFailed("TorchServe is not running")
        before = load_failures(torchserve.log_since_start(torchserve.ts_log_path), [name])
        params = {"url": archive, "model_name": name, "initial_workers": workers, "synchronous": "false"}
        response = await self._http.post("/models", params=params, headers=_bearer(keys.management))
        if response.status_code not in (200, 202):
            raise LoadFailed(f"TorchServe refused to load {archive}: {response.status_code} {response.text.strip()}")
        self._models.append(name)
        self._unknown_polls[name] = 0
        limit = self.settings.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            while not await self._has_ready_worker(name):
                self._check_loads(torchserve, [name], before)
                if time.monotonic() > deadline or not torchserve.alive:
                    raise TorchServeError(f"model {name!r} has no READY worker after {limit:.0f} s")
                await asyncio.sleep(0.2)
        except TorchServeError as e:
            await self.unregister(name)
            raise LoadFailed(str(e)) from None
        await self.poll_ready()

    async def unregister(self, name: str) -> None:
        """Unload model `name` (every version of it TorchServe holds); a model it does not know is no error."""
        if name in self._models:
            self._models.remove(name)
        keys = self._keys
        if self._http is not None and keys is not None:
            try:
                answer = await self._http.delete(f"/models/{name}", headers=_bearer(keys.management), timeout=30)
                if answer.status_code not in (200, 404):  # 404: TorchServe no longer has it (it restarted)
                    log.warning("unloading %s from TorchServe failed: HTTP %d %s", name, answer.status_code,
                                answer.text[:300])
            except httpx.HTTPError as e:
                log.warning("unloading %s from TorchServe failed: %s", name, e)
        self._set_ready({k: v for k, v in self._ready.items() if k != name})

    # --- keys --------------------------------------------------------------------------------------------

    @property
    def keys(self) -> Keys | None:
        return self._keys

    async def _read_keys_once(self) -> Keys | None:
        if self._endpoint is None:
            return None
        try:
            self._keys = Keys.read(self._endpoint.key_file)
        except (OSError, ValueError, KeyError):
            return None
        return self._keys

    async def _reload_keys(self, stale: str, kind: str = "inference") -> None:
        """Wait until the key file holds a `kind` ("inference" or "management") key other than `stale`:
        TorchServe drops the old key before it has rewritten the file."""
        deadline = time.monotonic() + self.settings.key_wait_s
        while self._endpoint is not None:
            try:
                keys = Keys.read(self._endpoint.key_file)
                if getattr(keys, kind) != stale:
                    self._keys = keys
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        raise Unavailable("the model server's keys are being renewed; retry shortly")

    async def renew_keys(self) -> None:
        """Have TorchServe issue new inference and management keys, and read them from its key file."""
        old = self._keys
        if self._http is None or old is None:
            raise Unavailable("the model server is not connected")
        for kind in ("inference", "management"):
            response = await self._http.get("/token", params={"type": kind}, headers=_bearer(old.api))
            response.raise_for_status()
        await self._reload_keys(stale=old.management, kind="management")  # the last one it renewed
        assert self._keys is not None
        log.info("renewed TorchServe's keys; they expire in %.0f s", self._keys.expires - time.time())

    async def _renew_loop(self) -> None:
        while True:
            assert self._keys is not None
            # Renew a margin before expiry: a third of the keys' lifetime when that is shorter.
            margin = min(self.settings.token_renew_margin_s, self.settings.token_expiration_min * 60 / 3)
            await asyncio.sleep(max(self._keys.expires - time.time() - margin, 0.5))
            try:
                await self.renew_keys()
            except (httpx.HTTPError, OSError, ValueError, KeyError, Unavailable) as e:
                log.warning("renewing TorchServe's keys failed (%s); retrying", e)

    # --- inference -----------------------------------------------------------------------------------------

    async def predict(self, model: str, payload: bytes, deadline: float) -> bytes:
        """TorchServe's prediction for one handler payload, by `deadline` (the loop's clock); its answer's
        payload. Failures are domain errors (server/errors.py)."""
        path = f"/predictions/{quote(model, safe='')}"
        for _ in range(3):
            pool, keys = self._inference, self._keys
            if pool is None or keys is None:
                raise Unavailable("the model server is down and restarting; retry shortly")
            if deadline <= asyncio.get_running_loop().time():
                raise DeadlineExceeded("the deadline passed before the request reached the model server")
            head = http1.request_head("POST", pool.authority, path, len(payload), "application/octet-stream",
                                      _bearer(keys.inference))
            try:
                async with asyncio.timeout_at(deadline):
                    status, answer = await pool.send((head, payload))
            except TimeoutError:
                raise DeadlineExceeded("the model server did not answer within the deadline") from None
            except (OSError, asyncio.IncompleteReadError, http1.HttpError):
                # TorchServe died (`stop` closed the connections under this call) or is not listening.
                raise Unavailable("the model server went down during the call; retry shortly") from None
            if status == 200:
                return answer
            text = answer.decode(errors="replace")
            if not stale_key(status, text) or self._endpoint is None:
                raise backend_error(status, text)
            # TorchServe renewed its keys under this call (it drops the old key before it has rewritten its key
            # file): wait for the new key, then try again.
            await self._reload_keys(stale=keys.inference)
        raise Unavailable("the model server refused its renewed key; retry shortly")


async def wait_until_ready(torchserve: TorchServe, timeout: float = 180.0) -> Keys:
    """For tests and the bench: block until a started TorchServe serves its models; its keys."""
    client = TorchServeClient()
    try:
        await client.start(torchserve, timeout)
        assert client.keys is not None
        return client.keys
    finally:
        await client.stop()
