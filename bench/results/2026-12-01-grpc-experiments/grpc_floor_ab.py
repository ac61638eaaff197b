"""A bare grpc.aio server (../2026-12-01-ab-lone-requests/grpc_floor.py: ModelInfer answered with a fixed tensor,
nothing else) with gRPC's default experiments and with server/grpc_env.py's, rounds interleaved; the load generator
keeps gRPC's defaults. Prints the server's CPU per request at concurrency 1 and 64 for each.

    .venv/bin/python bench/results/2026-12-01-grpc-experiments/grpc_floor_ab.py [--rounds 3] [--seconds 4]
"""

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import psutil

from server.grpc_env import EXPERIMENTS, VARIABLE

FLOOR = Path(__file__).resolve().parent.parent / "2026-12-01-ab-lone-requests" / "grpc_floor.py"


def floor_module():
    spec = importlib.util.spec_from_file_location("grpc_floor", FLOOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    floor = floor_module()
    for round_ in range(args.rounds):
        for experiments in ("", EXPERIMENTS) if round_ % 2 == 0 else (EXPERIMENTS, ""):
            env = {**os.environ, "GRPC_FLOOR_SERVER": "1", VARIABLE: experiments}
            child = subprocess.Popen([sys.executable, str(FLOOR)], env=env, stdout=subprocess.PIPE)
            try:
                assert child.stdout is not None
                print(f"round {round_}, {VARIABLE}={experiments!r}:", flush=True)
                asyncio.run(floor.load(int(child.stdout.readline()), psutil.Process(child.pid), args.seconds))
            finally:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
