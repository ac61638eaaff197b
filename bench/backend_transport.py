"""How the front door's call to TorchServe costs over each of TorchServe's inference APIs, side by side in one run.

    .venv/bin/python -m bench.backend_transport [--run runs/digits] [--seconds 4] [--rounds 2]

One TorchServe (token auth on, the front door's log configuration) serves the run's model packaged as the front
door ships it (batchSize 1); single-row handler payloads go to it back to back at concurrency 1 and 8, in turns:
over its gRPC `Predictions` with grpc.aio (what the front door used until 2026-11-30) and over its HTTP
`/predictions/<model>` with gradserve/http1.py's kept-alive connections (what it uses now). For each: calls/s, the
time per call, and the CPU per call of the caller (this process), TorchServe's JVM and its Python worker.
Results go to bench/results/backend_transport.json; later rounds are the ones to read (the JVM's compiler is
still busy during the first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench.stacks import running_torchserve
from gradserve import http1
from gradserve.errors import UsageError
from handlers import codec
from handlers.manifest import Manifest
from server.generated import torchserve_pb2, torchserve_pb2_grpc
from server.models import read_archive
from server.torchserve.client import Keys
from server.torchserve.process import TorchServe, archive_model_name
from training.package import PackageConfig, package

RESULTS = Path(__file__).resolve().parent / "results" / "backend_transport.json"
Call = Callable[[], Awaitable[None]]


async def over_grpc(torchserve: TorchServe, keys: Keys, model: str, payload: bytes) -> tuple[Call, Callable[[], Any]]:
    channel = grpc.aio.insecure_channel(torchserve.endpoint.grpc_target)
    stub = torchserve_pb2_grpc.InferenceAPIsServiceStub(channel)
    metadata = (("authorization", f"Bearer {keys.inference}"),)
    request = torchserve_pb2.PredictionsRequest(model_name=model, input={"data": payload})

    async def call() -> None:
        answer = await stub.Predictions(request, metadata=metadata, timeout=10)
        codec.decode(answer.prediction)

    return call, channel.close


async def over_http(torchserve: TorchServe, keys: Keys, model: str, payload: bytes) -> tuple[Call, Callable[[], Any]]:
    pool = http1.Pool.to(torchserve.endpoint.inference_url)
    head = http1.request_head("POST", pool.authority, f"/predictions/{model}", len(payload),
                              "application/octet-stream", {"authorization": f"Bearer {keys.inference}"})

    async def call() -> None:
        status, answer = await pool.send((head, payload))
        if status != 200:
            raise RuntimeError(f"TorchServe answered {status}: {answer[:200]!r}")
        codec.decode(answer)

    async def close() -> None:
        pool.close()

    return call, close


async def measure(way: Callable[..., Awaitable[tuple[Call, Callable[[], Any]]]], torchserve: TorchServe, keys: Keys,
                  manifest: Manifest, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` callers sending one row each back to back for `seconds` over `way`."""
    spec = manifest.inputs[0]
    row = np.random.default_rng(0).random((1, *spec.row_shape)).astype(codec.dtype_of(spec.datatype))
    payload = codec.encode({spec.name: row})
    model = archive_model_name(torchserve.config.model_store / torchserve.config.models[0])
    call, close = await way(torchserve, keys, model, payload)
    for _ in range(100):
        await call()
    tree = psutil.Process(torchserve.pid).children(recursive=True)  # under server/torchserve/guard.py
    processes = {"caller": psutil.Process(), "torchserve_java": next(p for p in tree if "java" in p.name()),
                 "torchserve_worker": next(p for p in tree if "model_service_worker" in " ".join(p.cmdline()))}
    before = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
    calls, stop = 0, time.monotonic() + seconds

    async def loop() -> None:
        nonlocal calls
        while time.monotonic() < stop:
            await call()
            calls += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    after = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
    await close()
    return {"calls_s": round(calls / elapsed, 1), "ms_per_call": round(1000 * elapsed * concurrency / calls, 3),
            "cpu_ms_per_call": {k: round(1000 * (after[k] - before[k]) / calls, 3) for k in processes}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/digits"), help="a training run (default: the demo's)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring window per way and concurrency")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gradserve-transport-") as tmp:
        try:
            archive = package(args.run, PackageConfig(model_store=f"{tmp}/store"))
        except UsageError as e:  # no such run yet: say so, and how to make one
            print(f"{e} (`make run` trains the demo's run into runs/digits; or pass --run)", file=sys.stderr)
            return 2
        manifest = read_archive(archive).manifest
        assert manifest is not None
        with running_torchserve(archive.parent, Path(tmp) / "ts", (archive.name,)) as (torchserve, keys):
            for round_ in range(args.rounds):
                for concurrency in (1, 8):
                    for name, way in (("grpc", over_grpc), ("http", over_http)):
                        figures = asyncio.run(measure(way, torchserve, keys, manifest, concurrency, args.seconds))
                        results.append({"round": round_, "concurrency": concurrency, "way": name, **figures})
                        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {psutil.cpu_count()} cores",
                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
