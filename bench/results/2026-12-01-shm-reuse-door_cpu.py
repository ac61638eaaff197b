"""The front door's CPU per request, 64-row ResNet gRPC requests at c=8 and 256-row at c=4, from the archive in
/tmp/prof-store (`gradserve package --config examples/resnet/gradserve.yaml --run examples/resnet/runs/resnet
--model-store /tmp/prof-store`). From a checkout: PYTHONPATH=. python <this file> LABEL"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.loadgen import OipGrpc, closed_loop
from bench.measure import LOGITS
from bench.stacks import FrontDoor, running_front_door


async def window(door: FrontDoor, x: np.ndarray, concurrency: int, seconds: float) -> tuple[dict[str, Any], float]:
    process = psutil.Process(door.process.pid)
    target = OipGrpc(door.grpc_target, None, "resnet", LOGITS)
    senders = await target.open(x, concurrency)
    try:
        await closed_loop(senders, 1.0, len(x))
        before = sum(process.cpu_times()[:2])
        summary = (await closed_loop(senders, seconds, len(x))).summary()
        return summary, sum(process.cpu_times()[:2]) - before
    finally:
        await target.close()


def main(label: str) -> None:
    with running_front_door(Path("/tmp/prof-store"), Path(f"/tmp/prof-work-{label}")) as door:
        for concurrency, rows in ((8, 64), (4, 256)):
            x = np.random.default_rng(0).random((rows, 3, 64, 64), dtype=np.float32).round(3)
            summary, cpu = asyncio.run(window(door, x, concurrency, 6.0))
            print(f"{label} c={concurrency} rows={rows}: {summary['req_s']:.1f} req/s, door CPU "
                  f"{1000 * cpu / summary['requests']:.2f} ms/request, errors {summary['errors']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
