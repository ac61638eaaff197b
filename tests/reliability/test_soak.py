"""Soak: 32 concurrent clients for ~30 s (short) or 5 min (long), across TorchServe key renewals (the keys
live 15 s in this front door): zero unexpected errors, steady memory in every process, latency recorded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, digits

from .conftest import LONG, scaled
from .load import MemorySampler, run_load, summary

CONCURRENCY = 32
ROWS = 4

pytestmark = pytest.mark.slow


def test_soak_at_concurrency_32(door: FrontDoor, reference: torch.nn.Module,
                                record: Callable[[str, dict[str, Any]], None]) -> None:
    x = np.ascontiguousarray(digits()[0][:ROWS])
    with torch.no_grad():
        labels = reference(torch.from_numpy(x)).argmax(1).numpy()
    key_file = door.workdir / "torchserve" / "key_file.json"
    asyncio.run(run_load(door.grpc_target, TOKEN, x, labels, concurrency=CONCURRENCY, duration_s=3))  # warm up
    first_key = json.loads(key_file.read_text())["inference"]["key"]

    sampler = MemorySampler(door.process.pid)
    sampler.start()
    duration = scaled(30, 300)
    calls = asyncio.run(run_load(door.grpc_target, TOKEN, x, labels, concurrency=CONCURRENCY, duration_s=duration))
    memory = sampler.stop()

    figures = summary(calls)
    keys_renewed = json.loads(key_file.read_text())["inference"]["key"] != first_key
    record("soak", {"concurrency": CONCURRENCY, "rows_per_request": ROWS, "duration_s": duration,
                    "keys_renewed_under_load": keys_renewed, **figures, "memory": memory})
    assert figures["lost"] == 0 and not figures["unexpected"], (
        f"lost {figures['lost']}, unexpected {figures['unexpected']}; front door log: {door.log_path}")
    assert figures["requests"] > CONCURRENCY * 10, figures
    assert keys_renewed, "TorchServe's keys were not renewed during the soak"
    # Steady memory: the front door and the workers may settle a little; a leak grows with the request count.
    limit = 100.0 if LONG else 64.0
    for role, m in memory.items():
        bound = 4 * limit if "java" in role else limit  # the JVM grows its heap before collecting
        assert m["growth_mib"] < bound, (role, m)
