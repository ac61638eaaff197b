"""`gradserve predict --input x.npy|x.json`: send the rows to the front door and print one JSON line per row.

The input is an array of images ([n, C, H, W], one image [C, H, W] or [H, W], or rows of C*H*W values),
scaled as the model expects (digits: pixel intensities in [0, 1]). JSON files hold the nested list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from client.grpc_client import Client
from gradserve import config as gradserve_config
from gradserve.config import ENV_TOKEN, env_field
from gradserve.errors import UsageError


@dataclass(frozen=True)
class PredictConfig:
    """Where and how `gradserve predict` asks; the `predict:` section of gradserve.yaml sets the defaults."""

    model: str = "digits"
    grpc: str = "127.0.0.1:8001"  # used unless `http` is set
    http: str | None = None  # the front door's base URL, e.g. http://127.0.0.1:8000
    token: str | None = env_field(ENV_TOKEN)
    timeout_s: float = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help=".npy or .json file of input rows")
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present)")
    parser.add_argument("--model", default=None, help="the served model (default digits)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", default=None, help="front door gRPC address (default 127.0.0.1:8001)")
    where.add_argument("--http", default=None, help="front door base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=None, help="bearer token (default: $GRADSERVE_TOKEN)")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=None, help="deadline in seconds")


def main(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in ("model", "grpc", "http", "token", "timeout_s")}
    config = gradserve_config.load(PredictConfig, gradserve_config.default_path(args.config), "predict", overrides)
    x = load_input(args.input)
    try:
        if config.http and not args.grpc:
            rows, labels = predict_http(config.http, config.model, x, config.token, config.timeout_s)
        else:
            rows, labels = asyncio.run(predict_grpc(config.grpc, config.model, x, config.token, config.timeout_s))
    except grpc.aio.AioRpcError as e:
        print(f"gradserve predict: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"gradserve predict: {e}", file=sys.stderr)
        return 1
    for i, (label, probabilities) in enumerate(zip(rows["label"], rows["probabilities"], strict=True)):
        name = labels[int(label)] if int(label) < len(labels) else str(int(label))
        print(json.dumps({"row": i, "label": name, "probability": round(float(probabilities[int(label)]), 6)}))
    return 0


def load_input(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".json":
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    raise UsageError(f"{path}: use an .npy or .json file")


def shape_rows(x: np.ndarray, row_shape: tuple[int, ...]) -> np.ndarray:
    """x as float32 [n, *row_shape]."""
    size = int(np.prod(row_shape))
    if x.size % size:
        raise UsageError(f"the input has {x.size} values, not a multiple of one row {list(row_shape)} ({size})")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *row_shape)


async def predict_grpc(target: str, model: str, x: np.ndarray, token: str | None, timeout: float
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
    async with Client(target, token=token, timeout=timeout) as client:
        meta = await client.metadata(model)
        row_shape = tuple(int(d) for d in meta.inputs[0].shape[1:])
        outputs = await client.infer(model, shape_rows(x, row_shape), ("label", "probabilities"),
                                     input_name=meta.inputs[0].name)
        labels = meta.parameters["labels"].string_param.split(",") if "labels" in meta.parameters else []
        return outputs, labels


def predict_http(url: str, model: str, x: np.ndarray, token: str | None, timeout: float
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        meta = _ok(http.get(f"/v2/models/{model}"))
        spec = meta["inputs"][0]
        rows = shape_rows(x, tuple(spec["shape"][1:]))
        body = {"inputs": [{"name": spec["name"], "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.ravel().tolist()}],
                "outputs": [{"name": "label"}, {"name": "probabilities"}]}
        answer = _ok(http.post(f"/v2/models/{model}/infer", json=body))
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    labels = meta.get("parameters", {}).get("labels")
    return outputs, labels.split(",") if labels else []


def _ok(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.json().get('error', response.text)}")
    return response.json()
