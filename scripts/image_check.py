"""Host-side checks of a running gradserve container; scripts/image_test.sh calls them.

predict:    the gRPC health service says SERVING, an unchanged Open Inference Protocol client (tritonclient)
            gets predictions for real digits over gRPC, REST gets the same rows, and both agree.
listeners:  reads the container's /proc/net/tcp and /proc/net/tcp6 on stdin; fails when anything but the
            front door (8000, 8001) listens beyond loopback, i.e. TorchServe must stay on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time

import grpc
import httpx
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.datasets import load_digits

FRONT_DOOR_PORTS = {8000, 8001}


def predict(args: argparse.Namespace) -> int:
    digits = load_digits()
    x = (digits.images[: args.rows] / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8), pixels in [0, 1]
    truth = digits.target[: args.rows]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}

    with grpc.insecure_channel(args.grpc) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health: {status}"

    start = time.perf_counter()
    client = triton.InferenceServerClient(args.grpc)
    request = triton.InferInput("input", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput(name) for name in ("label", "probabilities")]
    result = client.infer(args.model, [request], outputs=wanted, headers=headers, client_timeout=30)
    grpc_ms = (time.perf_counter() - start) * 1e3
    grpc_labels, grpc_probs = result.as_numpy("label"), result.as_numpy("probabilities")

    start = time.perf_counter()
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = httpx.post(f"{args.http}/v2/models/{args.model}/infer", json=body, headers=headers, timeout=30)
    response.raise_for_status()
    rest_ms = (time.perf_counter() - start) * 1e3
    outputs = {out["name"]: np.asarray(out["data"]).reshape(out["shape"]) for out in response.json()["outputs"]}

    assert grpc_labels.shape == (args.rows,), grpc_labels.shape
    assert np.allclose(grpc_probs.sum(axis=1), 1.0, atol=1e-4), "probabilities must sum to 1"
    assert np.array_equal(outputs["label"], grpc_labels), "gRPC and REST disagree on labels"
    assert np.allclose(outputs["probabilities"], grpc_probs, atol=1e-5), "gRPC and REST disagree on probabilities"
    accuracy = float((grpc_labels == truth).mean())
    print(f"gRPC {args.rows} rows in {grpc_ms:.0f} ms, REST in {rest_ms:.0f} ms; agree; "
          f"accuracy on these rows {accuracy:.2f}; labels {grpc_labels.tolist()}")
    return 0


def listeners(_: argparse.Namespace) -> int:
    public = set()
    for line in sys.stdin:
        fields = line.split()
        if len(fields) < 4 or fields[0] == "sl" or fields[3] != "0A":  # 0A: LISTEN
            continue
        host, port = fields[1].split(":")
        raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
        address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            public.add(int(port, 16))
    print(f"listening beyond loopback: {sorted(public)}")
    assert public <= FRONT_DOOR_PORTS, f"only the front door may listen beyond loopback, got {sorted(public)}"
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("predict")
    check.add_argument("--grpc", required=True, help="host:port of the front door's gRPC")
    check.add_argument("--http", required=True, help="http://host:port of the front door's REST")
    check.add_argument("--model", default="digits")
    check.add_argument("--rows", type=int, default=16)
    check.add_argument("--token", default=None)
    check.set_defaults(run=predict)
    commands.add_parser("listeners").set_defaults(run=listeners)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
