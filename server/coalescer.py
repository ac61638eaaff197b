"""Coalesce concurrent small requests for one model into one multi-row backend call.

TorchServe pays a fixed cost per request (its Java frontend, the worker round trip); grouping the rows of
callers that arrive together pays it once per group. The rules:

- A request is sent at once while fewer than `max_calls` backend calls are in flight, so a lone request
  never waits for company.
- Otherwise it queues; the queue leaves as one call when a call finishes, when it holds `max_rows` rows,
  or when its oldest request has waited `max_delay_s`, whichever comes first.
- A call asks the handler for the outputs any of its members wants (the union), and each caller gets exactly its
  own rows back. If a group fails because of bad input (which validation at the door should have caught), each
  member is retried alone so that only the culprit sees the error; failures of the backend itself (down,
  deadline) reach every member of the group.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidInput, Unavailable

Outputs = dict[str, np.ndarray]
# (rows, deadline on the loop's clock, the outputs wanted; empty: all) -> outputs whose first dimension is the
# number of rows
Call = Callable[[np.ndarray, float, frozenset[str]], Awaitable[Outputs]]


@dataclass
class _Pending:
    rows: np.ndarray
    deadline: float
    outputs: frozenset[str]  # empty: all
    future: asyncio.Future[Outputs]


class Coalescer:
    def __init__(
        self, call: Call, max_rows: int, max_delay_s: float, max_calls: int,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._call = call
        self._observe = observe or (lambda rows: None)  # told the rows of every backend call
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._max_calls = max(1, max_calls)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, rows: np.ndarray, deadline: float, outputs: frozenset[str] = frozenset()) -> Outputs:
        """`rows`' outputs (at least those of `outputs`; empty: all), by `deadline` on the loop's clock."""
        if self._max_rows <= 1 or len(rows) >= self._max_rows:
            return await self._send(rows, deadline, outputs)  # already a full group
        if not self._queue and self._in_flight < self._max_calls:
            return await self._alone(rows, deadline, outputs)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, deadline, outputs, future))
        self._queued_rows += len(rows)
        self._pump()
        return await future  # cancelling the caller cancels only its future, never the group

    def _pump(self) -> None:
        while self._queue and (self._in_flight < self._max_calls or self._queued_rows >= self._max_rows):
            self._dispatch()
        if self._queue and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._queue and self._in_flight < 2 * self._max_calls:
            self._dispatch()  # the oldest request has waited long enough: one extra call, within a bound
        self._pump()

    def _dispatch(self) -> None:
        group: list[_Pending] = []
        rows = 0
        while self._queue and (not group or rows + len(self._queue[0].rows) <= self._max_rows):
            pending = self._queue.popleft()
            self._queued_rows -= len(pending.rows)
            if not pending.future.done():  # skip callers that gave up while queued
                group.append(pending)
                rows += len(pending.rows)
        if not self._queue and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not group:
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _alone(self, rows: np.ndarray, deadline: float, outputs: frozenset[str]) -> Outputs:
        """A group of one sent from its caller's own task: no task, no future, no hand-over between them (at
        concurrency 1 that is every request). Cancelling the caller cancels its call, which has no other member."""
        self._in_flight += 1
        try:
            return await self._send(rows, deadline, outputs)
        finally:
            self._in_flight -= 1
            self._pump()

    async def _run(self, group: list[_Pending]) -> None:
        try:
            await self._answer(group)
        finally:
            self._in_flight -= 1
            self._pump()

    async def _answer(self, group: list[_Pending]) -> None:
        rows = group[0].rows if len(group) == 1 else np.concatenate([p.rows for p in group])  # (N, ...)
        wanted = frozenset() if any(not p.outputs for p in group) else frozenset().union(*(p.outputs for p in group))
        try:
            outputs = await self._send(rows, max(p.deadline for p in group), wanted)
        except InvalidInput as e:
            if len(group) == 1:
                _fail(group[0], e)
                return
            await asyncio.gather(*(self._answer([p]) for p in group))  # find the culprit
            return
        except BaseException as e:  # the backend's own failure: every member hears it
            cancelled = isinstance(e, asyncio.CancelledError)
            # A member handed a CancelledError would leave its RPC unanswered: it hears UNAVAILABLE instead.
            error = Unavailable("the call to the model server was cancelled; retry shortly") if cancelled else e
            for p in group:
                _fail(p, error)
            if cancelled:
                raise
            return
        start = 0
        for p in group:
            stop = start + len(p.rows)
            if not p.future.done():
                p.future.set_result({name: out[start:stop] for name, out in outputs.items()})
            start = stop

    async def _send(self, rows: np.ndarray, deadline: float, wanted: frozenset[str]) -> Outputs:
        self._observe(len(rows))
        outputs = await self._call(rows, deadline, wanted)
        for name, out in outputs.items():
            if len(out) != len(rows):
                raise RuntimeError(f"backend returned {len(out)} rows of {name!r} for {len(rows)} input rows")
        return outputs


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
