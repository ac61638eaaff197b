"""Faults under load: a TorchServe python worker killed with SIGKILL (TorchServe restarts it), TorchServe itself
killed (the front door's supervisor restarts it). In-flight requests end UNAVAILABLE or succeed on retry; none
hangs past its deadline; no request is lost. Each test ends with the stack ready again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, digits

from .conftest import scaled
from .load import run_load, summary

CONCURRENCY = 16
DEADLINE_S = 10.0
EXPECTED = {"UNAVAILABLE"}  # what an in-flight or new request may hear while a part restarts

pytestmark = pytest.mark.slow


def management(door: FrontDoor, path: str) -> Any:
    """TorchServe's management API, with the key the front door's TorchServe wrote."""
    workdir = door.workdir / "torchserve"
    port = next(line.split(":")[-1] for line in (workdir / "config.properties").read_text().splitlines()
                if line.startswith("management_address"))
    for _ in range(5):  # the front door renews the keys every few seconds here: a key read may just have expired
        key = json.loads((workdir / "key_file.json").read_text())["management"]["key"]
        answer = httpx.get(f"http://127.0.0.1:{port}{path}", headers={"authorization": f"Bearer {key}"}, timeout=5)
        if answer.status_code != 400:  # TorchServe answers a stale key with 400 InvalidKeyException
            break
        time.sleep(0.2)
    answer.raise_for_status()
    return answer.json()


def torchserve_name(door: FrontDoor, model: str) -> str:
    """The name TorchServe knows the model's loaded build by (the front door's <name>--<version>--<sha>)."""
    names = [m["modelName"] for m in management(door, "/models")["models"]]
    return next(n for n in names if n.startswith(f"{model}--"))


def worker_pids(door: FrontDoor, model: str) -> list[int]:
    return [w["pid"] for entry in management(door, f"/models/{torchserve_name(door, model)}")
            for w in entry["workers"] if w.get("status") == "READY"]


def load_and(door: FrontDoor, reference: torch.nn.Module, fault: Callable[[], Any], lead_s: float
             ) -> tuple[list, float]:
    """Run the load; `lead_s` into it run `fault` (in a thread); keep loading until the stack is ready again."""
    x = np.ascontiguousarray(digits()[0][:4])
    with torch.no_grad():
        labels = reference(torch.from_numpy(x)).argmax(1).numpy()
    recovered: list[float] = []

    async def inject() -> None:
        await asyncio.sleep(lead_s)
        started = time.monotonic()
        await asyncio.to_thread(fault)
        await asyncio.to_thread(door.wait_ready, 240)
        recovered.append(time.monotonic() - started)
        await asyncio.sleep(1.0)  # and a little more load on the recovered stack

    calls = asyncio.run(run_load(door.grpc_target, TOKEN, x, labels, concurrency=CONCURRENCY,
                                 duration_s=lead_s, timeout_s=DEADLINE_S, retry_for_s=240, during=inject))
    return calls, recovered[0]


def test_worker_killed_under_load(door: FrontDoor, reference: torch.nn.Module,
                                  record: Callable[[str, dict[str, Any]], None]) -> None:
    killed: list[int] = []

    def kill_worker() -> None:
        (pid,) = worker_pids(door, "digits")
        psutil.Process(pid).kill()
        killed.append(pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker_pids(door, "digits") in ([], [pid]):
            time.sleep(0.2)  # until TorchServe has a new READY worker

    calls, recovered = load_and(door, reference, kill_worker, scaled(3, 20))
    figures = summary(calls, EXPECTED)
    new = worker_pids(door, "digits")
    record("worker_killed", {"concurrency": CONCURRENCY, "deadline_s": DEADLINE_S, **figures,
                             "back_in_s": round(recovered, 1)})
    assert figures["lost"] == 0 and not figures["unexpected"], (
        f"lost {figures['lost']}, unexpected {figures['unexpected']}; front door log: {door.log_path}")
    assert new and killed[0] not in new, "TorchServe did not replace the killed worker"
    assert max(c.seconds for c in calls if len(c.attempts) == 1) < DEADLINE_S + 1  # nothing hung
    # TorchServe's log (server/torchserve/log4j2.xml) tells the worker's death and recovery, not each request.
    log = (door.workdir / "torchserve" / "logs" / "ts_log.log").read_text(errors="replace")
    assert f"{killed[0]} Worker disconnected" in log or "Retry worker" in log, log[-2000:]
    assert "Backend response time" not in log and "[METRICS]" not in log


def test_torchserve_killed_under_load(door: FrontDoor, reference: torch.nn.Module,
                                      record: Callable[[str, dict[str, Any]], None]) -> None:
    torchserve = door.torchserve()
    assert torchserve is not None
    front_door_pid = door.process.pid
    readiness: list[int] = []

    def kill_torchserve() -> None:
        torchserve.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            readiness.append(httpx.get(f"{door.http_url}/v2/health/ready", timeout=5).status_code)
            if readiness[-1] == 503:
                break
            time.sleep(0.1)

    calls, recovered = load_and(door, reference, kill_torchserve, scaled(3, 20))
    figures = summary(calls, EXPECTED)
    record("torchserve_killed", {"concurrency": CONCURRENCY, "deadline_s": DEADLINE_S, **figures,
                                 "back_in_s": round(recovered, 1)})
    assert readiness[-1] == 503, "readiness never turned false"
    assert figures["lost"] == 0 and not figures["unexpected"], (
        f"lost {figures['lost']}, unexpected {figures['unexpected']}; front door log: {door.log_path}")
    assert figures["failed_as_expected"].get("UNAVAILABLE", 0) > 0
    assert door.process.pid == front_door_pid and door.process.poll() is None  # the front door was not restarted
    restarted = door.torchserve()
    assert restarted is not None and restarted.pid != torchserve.pid
    assert max(c.seconds for c in calls if len(c.attempts) == 1) < DEADLINE_S + 1
