"""The front door's reading of a JSON inference request: simdjson (server/fastjson.py) vs the general parser
(pydantic_core into Python values, then numpy), on the bodies the bench's REST client sends, in one run.

    .venv/bin/python -m bench.rest_parse [--seconds 2]

For each input shape of the bench's models and 1, 64 and 256 rows: the CPU time of `read_inference` both ways
(fastest of interleaved chunks, as bench/handler_throughput.py times) and their ratio. Writes
bench/results/rest_parse.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from bench.handler_throughput import best_seconds_per_call
from bench.loadgen import OipRest
from server import fastjson
from server.rest_wire import Inference, read_inference

SHAPES = {"digits": (1, 8, 8), "digits-rgb": (3, 32, 32), "resnet": (3, 64, 64), "cancer": (30,)}
ROWS = (1, 64, 256)
RESULTS = Path(__file__).resolve().parent / "results" / "rest_parse.json"


def general(body: bytes) -> Inference:
    """read_inference without the simdjson path."""
    with mock.patch.object(fastjson, "parse", return_value=None):
        return read_inference(body, None)


def measure(seconds: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    table = []
    for model, shape in SHAPES.items():
        for rows in ROWS:
            x = rng.random((rows, *shape), dtype=np.float32)
            body, _ = OipRest("", None, model).payload(x)
            if not np.array_equal(read_inference(body, None).inputs["input"], general(body).inputs["input"]):
                raise AssertionError(f"{model} {rows} rows: the two parsers disagree")
            best = best_seconds_per_call({"simdjson": lambda body=body: read_inference(body, None),
                                          "general": lambda body=body: general(body)}, seconds)
            table.append({"model": model, "rows": rows, "body_bytes": len(body),
                          "simdjson_ms": best["simdjson"] * 1e3, "general_ms": best["general"] * 1e3,
                          "speedup": best["general"] / best["simdjson"]})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per body (both ways)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    table = measure(args.seconds)
    print(f"{'model':>10} {'rows':>5} {'body KiB':>9} {'simdjson ms':>12} {'general ms':>11} {'speedup':>8}")
    for r in table:
        print(f"{r['model']:>10} {r['rows']:>5} {r['body_bytes'] / 1024:>9.0f} {r['simdjson_ms']:>12.3f} "
              f"{r['general_ms']:>11.3f} {r['speedup']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "server.rest_wire.read_inference of the bench REST client's JSON bodies: simdjson (server/fastjson.py)"
                " vs the general parser; fastest interleaved chunk, process CPU time",
        "machine": platform.machine(), "results": table}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
