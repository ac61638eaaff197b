"""An idle front door's CPU, this checkout's against another's (side a), both running at once.

    .venv/bin/python bench/results/2026-12-01-ab-lone-requests/idle.py ../base [--seconds 60]

Each side is a `gradserve serve` of the demo's archive (model_store/digits.mar) that gets no request; after 15 s
of settling, the CPU each process spends over --seconds is printed per second (ms of CPU per s).
"""

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import psutil

from bench.frontdoor_ab import code_env
from bench.stacks import running_front_door

parser = argparse.ArgumentParser()
parser.add_argument("base", type=Path, help="the other checkout (side a)")
parser.add_argument("--seconds", type=float, default=60.0)
args = parser.parse_args()
with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    doors = {side: stack.enter_context(running_front_door(Path("model_store").resolve(), Path(tmp, side), env=env))
             for side, env in (("a", code_env(args.base)), ("b", {}))}
    time.sleep(15)
    processes = {side: [psutil.Process(d.process.pid), *psutil.Process(d.process.pid).children(recursive=True)]
                 for side, d in doors.items()}
    before = {p: sum(p.cpu_times()[:2]) for ps in processes.values() for p in ps}
    time.sleep(args.seconds)
    for side, ps in processes.items():
        for p in ps:
            name = "front door" if p.pid == doors[side].process.pid else ("java" if "java" in p.name() else p.name())
            spent = sum(p.cpu_times()[:2]) - before[p]
            if spent > 0:
                print(f"side {side} {name:12s} {1000 * spent / args.seconds:6.1f} ms CPU/s")
