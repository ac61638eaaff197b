"""The floor of a Python gRPC server on this machine: grpc.aio on uvloop answering ModelInfer with a fixed logits
tensor, the request parsed and the response built as protobuf messages and nothing else (no model, no TorchServe).
Its CPU per request against the front door's says how much of the front door's is its own work.

    .venv/bin/python bench/results/2026-12-01-ab-lone-requests/grpc_floor.py [--seconds 10]

The load is bench/loadgen.py's unary gRPC client (as `gradserve bench` sends it) at concurrency 1 and 64.
"""

import argparse
import asyncio
import os
import subprocess
import sys

import grpc
import numpy as np
import psutil
import uvloop

from bench.loadgen import OipGrpc, closed_loop
from bench.measure import LOGITS
from server.generated import grpc_service_pb2 as pb


async def serve() -> None:
    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(np.zeros(10, np.float32).tobytes())
        return response

    handler = grpc.unary_unary_rpc_method_handler(infer, request_deserializer=pb.ModelInferRequest.FromString,
                                                  response_serializer=pb.ModelInferResponse.SerializeToString)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def load(port: int, server: psutil.Process, seconds: float) -> None:
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    for concurrency in (1, 64):
        target = OipGrpc(f"127.0.0.1:{port}", None, "digits", LOGITS)
        senders = await target.open(x, concurrency)
        await closed_loop(senders, 2)
        before = sum(server.cpu_times()[:2])
        window = (await closed_loop(senders, seconds)).summary()
        spent = sum(server.cpu_times()[:2]) - before
        await target.close()
        print(f"c={concurrency}: {window['req_s']:.0f} req/s, p50 {window['p50_ms']:.2f} ms, server CPU "
              f"{1000 * spent / window['requests']:.3f} ms a request")


if __name__ == "__main__" and os.environ.get("GRPC_FLOOR_SERVER"):
    uvloop.run(serve())
elif __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    child = subprocess.Popen([sys.executable, __file__], env={**os.environ, "GRPC_FLOOR_SERVER": "1"},
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        asyncio.run(load(int(child.stdout.readline()), psutil.Process(child.pid), args.seconds))
    finally:
        child.kill()
