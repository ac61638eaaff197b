"""gRPC core's settings for a front-door process. gRPC reads them from the environment once, when grpc is imported,
so `gradserve serve` and `gradserve run` apply them before they import anything (gradserve/cli.py); the further
front-door processes (server/doors.py) inherit them. This module must not import grpc.

EXPERIMENTS turns off two of the experiments grpcio 1.81 turns on by default, which move a server's connections
onto gRPC's EventEngine: its own threads then read and write every connection and hand each event over to the
thread that polls for grpc.aio, which hands it to the event loop. Without them the poller reads the sockets itself.
A bare grpc.aio server answering ModelInfer, rounds interleaved, two runs of 4 and 6 rounds
(bench/results/2026-12-01-grpc-experiments/grpc_floor_ab.py): medians of CPU per request 0.42-0.44 -> 0.35-0.36 ms at
concurrency 1 and 0.37-0.41 -> 0.29 ms at 64, lower in 7 and 8 of the 10 rounds.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

VARIABLE = "GRPC_EXPERIMENTS"
EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Name EXPERIMENTS in GRPC_EXPERIMENTS unless it is set already: yours wins (set it empty for gRPC's own
    defaults)."""
    environ.setdefault(VARIABLE, EXPERIMENTS)
