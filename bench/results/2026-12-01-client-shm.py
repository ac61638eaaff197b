"""Big gRPC requests with their input in the client's shared memory (Triton's system shared memory extension)
against the same requests with raw_input_contents: one front door, windows alternating, per request the front
door's CPU and the whole server's. ResNet archive from `gradserve package --config examples/resnet/gradserve.yaml
--run examples/resnet/runs/resnet --model-store STORE`. From the repository root:

    .venv/bin/python bench/results/2026-12-01-client-shm.py STORE [ROUNDS]
"""

from __future__ import annotations

import asyncio
import sys
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench.loadgen import OipGrpc, closed_loop
from bench.measure import LOGITS
from bench.stacks import FrontDoor, running_front_door
from client import grpc_client as fd_client
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc


class InRegion(OipGrpc):
    """ModelInfer whose input is read from a registered region holding exactly the request's rows."""

    def payload(self, x: np.ndarray) -> bytes:
        request = fd_client.request(self.model, x, self.outputs)
        del request.raw_input_contents[:]
        parameters = request.inputs[0].parameters
        parameters["shared_memory_region"].string_param = f"rows{len(x)}"
        parameters["shared_memory_byte_size"].int64_param = x.nbytes
        return request.SerializeToString()


async def window(door: FrontDoor, way: type[OipGrpc], x: np.ndarray, concurrency: int,
                 seconds: float) -> tuple[float, float, float]:
    door_process = psutil.Process(door.process.pid)
    server = [door_process, *door_process.children(recursive=True)]
    target = way(door.grpc_target, None, "resnet", LOGITS)
    senders = await target.open(x, concurrency)
    try:
        await closed_loop(senders, 1.0, len(x))
        before = [sum(p.cpu_times()[:2]) for p in server]
        summary = (await closed_loop(senders, seconds, len(x))).summary()
        spent = [sum(p.cpu_times()[:2]) - b for p, b in zip(server, before, strict=True)]
    finally:
        await target.close()
    if summary["errors"]:
        raise RuntimeError(summary["error_samples"])
    n = summary["requests"]
    return summary["req_s"], 1000 * spent[0] / n, 1000 * sum(spent) / n


def main(store: str, rounds: int) -> None:
    loads = ((8, 64), (4, 256))
    rng = np.random.default_rng(0)
    rows = {r: rng.random((r, 3, 64, 64), dtype=np.float32).round(3) for _, r in loads}
    objects = {r: shared_memory.SharedMemory(create=True, size=x.nbytes) for r, x in rows.items()}
    try:
        with running_front_door(Path(store), Path("/tmp/gradserve-client-shm")) as door:
            stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(door.grpc_target))
            for r, x in rows.items():
                np.ndarray(x.shape, x.dtype, objects[r].buf)[:] = x
                stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                    name=f"rows{r}", key=f"/{objects[r].name}", byte_size=x.nbytes))
            for round_ in range(rounds):
                for concurrency, r in loads:
                    ways = (OipGrpc, InRegion) if round_ % 2 == 0 else (InRegion, OipGrpc)
                    for way in ways:
                        req_s, door_ms, server_ms = asyncio.run(window(door, way, rows[r], concurrency, 5.0))
                        label = "region" if way is InRegion else "raw"
                        print(f"round {round_} c={concurrency} rows={r} {label:6}: {req_s:6.1f} req/s, CPU per "
                              f"request: front door {door_ms:5.2f} ms, server {server_ms:6.2f} ms", flush=True)
    finally:
        for shm in objects.values():
            shm.close()
            shm.unlink()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
