"""The front door's reading of a JSON inference request: simdjson (server/fastjson.py) vs the general parser
(pydantic_core into Python values, then numpy), on the bodies the bench's REST client sends, in one run; and of a
gRPC request's typed FP32 contents: from their wire bytes (server/grpc_servicer.py) vs element by element.

    .venv/bin/python -m bench.rest_parse [--seconds 2]

For each input shape of the bench's models and 1, 64 and 256 rows: the CPU time of each way (fastest of
interleaved chunks, as bench/handler_throughput.py times) and their ratio. Writes bench/results/rest_parse.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from bench.handler_throughput import best_seconds_per_call
from bench.loadgen import OipRest
from server import fastjson
from server.generated import grpc_service_pb2 as pb
from server.grpc_servicer import decode_input
from server.rest_wire import Inference, read_inference

SHAPES = {"digits": (1, 8, 8), "digits-rgb": (3, 32, 32), "resnet": (3, 64, 64), "cancer": (30,)}
ROWS = (1, 64, 256)
RESULTS = Path(__file__).resolve().parent / "results" / "rest_parse.json"


def general(body: bytes) -> Inference:
    """read_inference without the simdjson path."""
    with mock.patch.object(fastjson, "parse", return_value=None):
        return read_inference(body, None)


def cases() -> Iterator[tuple[str, int, np.ndarray]]:
    """(model, rows, the rows) for each input shape of the bench's models and each row count."""
    rng = np.random.default_rng(0)
    for model, shape in SHAPES.items():
        for rows in ROWS:
            yield model, rows, rng.random((rows, *shape), dtype=np.float32)


def measure(seconds: float) -> list[dict[str, Any]]:
    table = []
    for model, rows, x in cases():
        body, _ = OipRest("", None, model).payload(x)
        if not np.array_equal(read_inference(body, None).inputs["input"], general(body).inputs["input"]):
            raise AssertionError(f"{model} {rows} rows: the two parsers disagree")
        best = best_seconds_per_call({"simdjson": lambda body=body: read_inference(body, None),
                                      "general": lambda body=body: general(body)}, seconds)
        table.append({"model": model, "rows": rows, "body_bytes": len(body),
                      "simdjson_ms": best["simdjson"] * 1e3, "general_ms": best["general"] * 1e3,
                      "speedup": best["general"] / best["simdjson"]})
    return table


def measure_typed(seconds: float) -> list[dict[str, Any]]:
    """gRPC typed contents (`contents.fp32_contents`), as clients that do not use raw_input_contents send them."""
    table = []
    for model, rows, x in cases():
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
        tensor.contents.fp32_contents.extend(x.ravel())
        if not np.array_equal(decode_input(tensor, None), x):
            raise AssertionError(f"{model} {rows} rows: typed contents read wrong")
        best = best_seconds_per_call({
            "wire": lambda tensor=tensor: decode_input(tensor, None),
            "elements": lambda tensor=tensor: np.asarray(tensor.contents.fp32_contents, dtype=np.float32)}, seconds)
        table.append({"model": model, "rows": rows, "values": x.size, "wire_ms": best["wire"] * 1e3,
                      "elements_ms": best["elements"] * 1e3, "speedup": best["elements"] / best["wire"]})
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
    typed = measure_typed(args.seconds)
    print(f"\n{'model':>10} {'rows':>5} {'values':>9} {'wire ms':>12} {'elements ms':>11} {'speedup':>8}")
    for r in typed:
        print(f"{r['model']:>10} {r['rows']:>5} {r['values']:>9} {r['wire_ms']:>12.3f} {r['elements_ms']:>11.3f} "
              f"{r['speedup']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "server.rest_wire.read_inference of the bench REST client's JSON bodies: simdjson (server/fastjson.py)"
                " vs the general parser; gRPC typed FP32 contents from their wire bytes vs element by element;"
                " fastest interleaved chunk, process CPU time",
        "machine": platform.machine(), "results": table, "grpc_typed": typed}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
