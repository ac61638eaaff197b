"""Load for the reliability scenarios: concurrent gRPC ModelInfer calls on one asyncio loop, each with a
deadline (and, where a scenario allows it, retried while the answer is UNAVAILABLE), plus a sampler of the
memory of every process of the stack. Figures come back as plain dicts for the results JSON."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil

from client.grpc_client import decode, request
from server.generated import grpc_service_pb2_grpc as pb_grpc

HANG_SLACK_S = 5.0  # an answer this long after its deadline counts as a hang


@dataclass
class Call:
    started: float  # time.monotonic()
    seconds: float  # until the final answer, retries included
    attempts: list[str] = field(default_factory=list)  # status name of each attempt; "HANG", "WRONG" are ours

    @property
    def code(self) -> str:
        return self.attempts[-1]


async def run_load(target: str, token: str, x: np.ndarray, labels: np.ndarray, *, concurrency: int,
                   duration_s: float, timeout_s: float = 30.0, retry_for_s: float = 0.0, model: str = "digits",
                   during: Callable[[], Awaitable[Any]] | None = None) -> list[Call]:
    """`concurrency` clients send `x` in a loop for `duration_s` and check every answer against `labels`.
    A call answered UNAVAILABLE is retried (after 0.2 s) while it is younger than `retry_for_s`. `during`
    runs concurrently (the fault to inject); the load lasts at least until it returns."""
    metadata = (("authorization", f"Bearer {token}"),)
    message = request(model, x)
    calls: list[Call] = []
    done = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> Call:
            call = Call(time.monotonic(), 0.0)
            while True:
                try:
                    response = await asyncio.wait_for(stub.ModelInfer(message, timeout=timeout_s, metadata=metadata),
                                                      timeout_s + HANG_SLACK_S)
                    ok = np.array_equal(decode(response)["label"], labels)
                    call.attempts.append("OK" if ok else "WRONG")
                except grpc.aio.AioRpcError as e:
                    call.attempts.append(e.code().name)
                except TimeoutError:
                    call.attempts.append("HANG")
                age = time.monotonic() - call.started
                if call.code != "UNAVAILABLE" or age >= retry_for_s:
                    call.seconds = age
                    return call
                await asyncio.sleep(0.2)

        async def client() -> None:
            end = time.monotonic() + duration_s
            while time.monotonic() < end or not done.is_set():
                calls.append(await one())

        async def fault() -> None:
            try:
                if during is not None:
                    await during()
            finally:
                done.set()

        await asyncio.gather(fault(), *(client() for _ in range(concurrency)))
    return calls


def summary(calls: list[Call], expected: Collection[str] = ()) -> dict[str, Any]:
    """Requests sent, answered OK, failed as expected (attempts with a status in `expected`), lost (requests
    whose final answer is neither OK nor expected: a wrong answer, a hang, another status), latencies."""
    finals = Counter(c.code for c in calls)
    failed = Counter(a for c in calls for a in c.attempts if a != "OK")
    ok = [c.seconds for c in calls if c.code == "OK"]
    elapsed = max((c.started + c.seconds for c in calls), default=0) - min((c.started for c in calls), default=0)
    return {
        "requests": len(calls),
        "attempts": sum(len(c.attempts) for c in calls),
        "ok": finals["OK"],
        "failed_as_expected": {k: v for k, v in failed.items() if k in expected},
        "unexpected": {k: v for k, v in failed.items() if k not in expected},
        "lost": sum(n for code, n in finals.items() if code != "OK" and code not in expected),
        "throughput_rps": round(len(calls) / elapsed, 1) if elapsed else 0.0,
        "latency_ms": percentiles(ok),
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    p50, p90, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 90, 99])
    return {"p50": round(p50, 2), "p90": round(p90, 2), "p99": round(p99, 2), "max": round(max(seconds) * 1000, 2)}


def stack(front_door_pid: int) -> dict[str, psutil.Process]:
    """Every process of the stack by role: the front door, TorchServe (java), its python workers."""
    door = psutil.Process(front_door_pid)
    processes = {"front door": door}
    for child in door.children(recursive=True):
        try:
            if "java" in child.name():
                processes["torchserve (java)"] = child
            elif any("model_service_worker" in part for part in child.cmdline()):
                processes[f"worker {child.pid}"] = child
        except psutil.Error:
            continue
    return processes


class MemorySampler(threading.Thread):
    """Samples the resident memory of every process of the stack every `interval_s` until stopped."""

    def __init__(self, front_door_pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self._pid, self._interval = front_door_pid, interval_s
        self._stop_event = threading.Event()
        self.samples: dict[str, list[float]] = {}

    def run(self) -> None:
        while not self._stop_event.is_set():
            for role, process in stack(self._pid).items():
                with contextlib.suppress(psutil.Error):
                    self.samples.setdefault(role, []).append(process.memory_info().rss / 2**20)
            self._stop_event.wait(self._interval)

    def stop(self) -> dict[str, dict[str, float]]:
        """Per process: MiB at the first and last sample, the peak, and the growth (last - first)."""
        self._stop_event.set()
        self.join(10)
        return {role: {"start_mib": round(s[0], 1), "end_mib": round(s[-1], 1), "peak_mib": round(max(s), 1),
                       "growth_mib": round(s[-1] - s[0], 1)} for role, s in self.samples.items() if len(s) > 1}
