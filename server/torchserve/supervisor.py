"""Keeps one TorchServe running behind the front door: start it, wait until it serves, hand it to the client;
when it dies, the client reports its models not ready and TorchServe is started again after a growing delay."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.config import TorchServeSection
from server.torchserve.client import TorchServeClient
from server.torchserve.process import TorchServe, TorchServeConfig, TorchServeError

log = logging.getLogger("gradserve.serve")


class Supervisor:
    def __init__(self, process_config: TorchServeConfig, client: TorchServeClient, settings: TorchServeSection,
                 on_started: Callable[[TorchServe], Awaitable[None]] | None = None,
                 on_stopped: Callable[[], None] = lambda: None, on_restart: Callable[[], None] = lambda: None) -> None:
        self.torchserve = TorchServe(process_config)
        self._client = client
        self._settings = settings
        self._on_started = on_started  # told once TorchServe serves (the model manager loads the store then)
        self._on_stopped = on_stopped  # told when it has died
        self._on_restart = on_restart  # told before each restart (the restarts metric)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.stop()
        await asyncio.to_thread(self.torchserve.stop)

    async def _run(self) -> None:
        delay = self._settings.restart_backoff_s
        first = True
        while True:
            if not first:
                self._on_restart()
                log.warning("restarting TorchServe in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.restart_backoff_max_s)
            first = False
            if not await self._start():
                continue
            healthy_since = asyncio.get_running_loop().time()
            await self._watch()
            if asyncio.get_running_loop().time() - healthy_since > self._settings.healthy_after_s:
                delay = self._settings.restart_backoff_s  # it ran fine for a while: start over gently

    async def _start(self) -> bool:
        """Start TorchServe and wait until it serves; False (logged, process stopped) when it did not come up."""
        try:
            await asyncio.to_thread(self.torchserve.start)
            await self._client.start(self.torchserve)
        except Exception as e:  # noqa: BLE001 - e.g. an unwritable working folder: say so, and keep trying
            if isinstance(e, TorchServeError):
                log.error("TorchServe did not come up: %s", e)
            else:
                log.exception("starting TorchServe failed")
            await asyncio.to_thread(self.torchserve.stop, 2.0)
            return False
        log.info("TorchServe ready (pid %s)", self.torchserve.pid)
        if self._on_started is not None:
            try:
                await self._on_started(self.torchserve)
            except Exception:  # noqa: BLE001 - loading the store must not end the supervision
                log.exception("loading the model store into TorchServe failed")
        return True

    async def _watch(self) -> None:
        """Until TorchServe exits; then its models are not ready and its process group is reaped."""
        ts = self.torchserve
        while ts.alive:
            await asyncio.sleep(0.5)
        log.error("TorchServe (pid %s) exited with code %s; last log lines:\n%s", ts.pid, ts.returncode,
                  ts.log_tail(10))
        await self._client.stop()
        self._on_stopped()
        await asyncio.to_thread(ts.stop, 2.0)  # reap its workers too
