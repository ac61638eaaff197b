"""The image's HEALTHCHECK: ask the front door's gRPC health service (grpc.health.v1) whether it serves.

    python -m client.healthcheck [HOST:PORT] [--service NAME] [--timeout SECONDS]

Exits 0 when the status is SERVING and 1 otherwise (not serving, unreachable, deadline passed), which is what
Docker and podman expect of a health check. Kubernetes asks the same service with its native `grpc:` probes.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name the server at `address` reports for `service` ("" means the whole server)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:8001", help="front door gRPC host:port")
    parser.add_argument("--service", default="", help="health service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {args.address}: {err.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
