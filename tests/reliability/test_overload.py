"""A model slower than the deadline (DEADLINE_EXCEEDED in time, the worker not wedged) and a full queue
(RESOURCE_EXHAUSTED at once, not a hang). `slow` is the demo archive with a handler that sleeps 1 s per batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, digits

from client.grpc_client import decode, request
from server.generated import grpc_service_pb2_grpc as pb_grpc

from .conftest import MAX_IN_FLIGHT, SLOW_SLEEP_S, scaled
from .load import percentiles

AUTH = (("authorization", f"Bearer {TOKEN}"),)

pytestmark = pytest.mark.slow


async def burst(target: str, model: str, x: np.ndarray, count: int, timeout: float) -> list[tuple[str, float]]:
    """`count` concurrent ModelInfer calls: (status name, seconds to the answer) of each."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> tuple[str, float]:
            started = time.monotonic()
            try:
                await stub.ModelInfer(request(model, x), timeout=timeout, metadata=AUTH)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            return code, time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))


def test_slow_model_gets_deadline_exceeded_and_the_worker_recovers(
        door: FrontDoor, reference: torch.nn.Module, record: Callable[[str, dict[str, Any]], None]) -> None:
    x = np.ascontiguousarray(digits()[0][:3])
    deadline = 0.3
    count = int(scaled(8, MAX_IN_FLIGHT))  # all admitted: this scenario is about deadlines, not the queue
    answers = asyncio.run(burst(door.grpc_target, "slow", x, count, deadline))
    late = [seconds - deadline for _, seconds in answers]
    rest = httpx.post(f"{door.http_url}/v2/models/slow/infer", headers={**door.headers, "timeout": str(deadline)},
                      json={"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}, timeout=30)

    # Not wedged: the same worker answers a caller with a generous deadline, the other model is untouched.
    started = time.monotonic()
    with grpc.insecure_channel(door.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        slow = decode(stub.ModelInfer(request("slow", x), timeout=30, metadata=AUTH))
        recovered = time.monotonic() - started
        fast = decode(stub.ModelInfer(request("digits", x), timeout=5, metadata=AUTH))
    with torch.no_grad():
        labels = reference(torch.from_numpy(x)).argmax(1).numpy()

    record("slow_model", {"requests": count + 1, "deadline_s": deadline,
                          "failed_as_expected": {"DEADLINE_EXCEEDED": sum(c == "DEADLINE_EXCEEDED" for c, _ in answers),
                                                 "HTTP 504": int(rest.status_code == 504)},
                          "lost": sum(c != "DEADLINE_EXCEEDED" for c, _ in answers) + int(rest.status_code != 504),
                          "answered_after_deadline_ms": percentiles(late),
                          "next_request_answered_in_s": round(recovered, 2)})
    assert {c for c, _ in answers} == {"DEADLINE_EXCEEDED"}, answers
    assert max(late) < 1.0, f"a caller waited {max(late):.2f} s past its deadline"
    assert rest.status_code == 504 and "deadline" in rest.json()["error"]
    assert np.array_equal(slow["label"], labels) and np.array_equal(fast["label"], labels)
    assert recovered < 10 * SLOW_SLEEP_S


def test_full_queue_is_refused_at_once(door: FrontDoor, record: Callable[[str, dict[str, Any]], None]) -> None:
    x = np.ascontiguousarray(digits()[0][:1])
    count = 3 * MAX_IN_FLIGHT
    rounds = int(scaled(1, 10))
    answers = [a for _ in range(rounds) for a in asyncio.run(burst(door.grpc_target, "slow", x, count, 60))]
    refused = [seconds for code, seconds in answers if code == "RESOURCE_EXHAUSTED"]
    served = [seconds for code, seconds in answers if code == "OK"]
    record("full_queue", {"requests": len(answers), "max_in_flight": MAX_IN_FLIGHT, "ok": len(served),
                          "failed_as_expected": {"RESOURCE_EXHAUSTED": len(refused)},
                          "lost": len(answers) - len(refused) - len(served),
                          "refused_in_ms": percentiles(refused), "served_in_ms": percentiles(served)})
    assert len(refused) + len(served) == len(answers), {c for c, _ in answers}
    assert refused and served
    assert max(refused) < SLOW_SLEEP_S, "a refusal waited for the queue: it should be immediate"
    assert httpx.get(f"{door.http_url}/v2/health/ready").status_code == 200
