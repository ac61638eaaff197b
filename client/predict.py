"""`gradserve predict`: send rows to the front door (gRPC, or REST with --http) and print one JSON line per row.

What a user has, for the model's contract (its ModelMetadata):
- `--image a.png b.jpg ...`: image files, sent as they are (the `image` input); the server decodes and resizes
  them as training did;
- `--csv rows.csv`: table rows with the model's feature columns by name (an `id` column names the rows);
- `--input x.npy|x.json`: the model's input tensor itself ([n, *row_shape], or anything that reshapes to it),
  scaled as the model expects (image pixels in [0, 1]).
A classifier's line says the class name and its probability; a regressor's, its prediction per target.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from client import batch_io
from client.contract import ModelContract, metadata_dict
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
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help=".npy or .json file of input rows (the model's tensor)")
    what.add_argument("--image", type=Path, nargs="+", help="image files (PNG, JPEG, ...) for an image model")
    what.add_argument("--csv", type=Path, help="CSV of table rows with the model's feature columns")
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present)")
    parser.add_argument("--model", default=None, help="the served model (default digits)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", default=None, help="front door gRPC address (default 127.0.0.1:8001)")
    where.add_argument("--http", default=None, help="front door base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: $GRADSERVE_TOKEN, which `ps` does not show)")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=None, help="deadline in seconds")


@dataclass(frozen=True)
class Rows:
    """One request's worth: the model input it goes to, its values, and a name per row."""

    input_name: str
    values: np.ndarray  # float32 [n, *row_shape], or an object array of encoded files
    ids: list[str]


def main(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in ("model", "grpc", "http", "token", "timeout_s")}
    config = gradserve_config.load(PredictConfig, gradserve_config.default_path(args.config), "predict", overrides)
    try:
        if config.http and not args.grpc:
            contract, outputs, rows = predict_http(config, args)
        else:
            contract, outputs, rows = asyncio.run(predict_grpc(config, args))
    except grpc.aio.AioRpcError as e:
        print(f"gradserve predict: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"gradserve predict: {e}", file=sys.stderr)
        return 1
    for line in lines(contract, outputs, rows):
        print(json.dumps(line))
    return 0


def rows_for(args: argparse.Namespace, contract: ModelContract) -> Rows:
    """The request's rows, from what the user gave, shaped by the model's contract."""
    if args.image:
        if not contract.takes_images:
            raise UsageError(f"model {contract.name!r} does not take images; send --csv or --input rows")
        return Rows("image", np.array([_read(p) for p in args.image], dtype=object), [str(p) for p in args.image])
    if args.csv:
        if not contract.feature_names:
            raise UsageError(f"model {contract.name!r} takes no table rows; send --image files or --input")
        records = list(batch_io.table_records(args.csv, contract.feature_names))
        if bad := [(row_id, str(v)) for row_id, v in records if isinstance(v, Exception)]:
            raise UsageError(f"{args.csv}: row {bad[0][0]}: {bad[0][1]}")
        values = np.asarray([v for _, v in records], dtype=np.float32).reshape(-1, *contract.row_shape)
        return Rows("input", values, [row_id for row_id, _ in records])
    x = shape_rows(load_input(args.input), contract.row_shape)
    return Rows("input", x, [str(i) for i in range(len(x))])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def lines(contract: ModelContract, outputs: dict[str, np.ndarray], rows: Rows) -> list[dict[str, Any]]:
    """One JSON object per row: the class name and its probability, or the prediction per target."""
    out = []
    for i, row_id in enumerate(rows.ids):
        line: dict[str, Any] = {"row": i}
        if rows.input_name == "image" or row_id != str(i):
            line["id"] = row_id
        if contract.task == "regression":
            line["prediction"] = dict(zip(contract.names, map(float, outputs["prediction"][i]), strict=False))
        else:
            k = int(np.argmax(outputs["probabilities"][i]))
            name = outputs["class_name"][i]
            line["label"] = name.decode() if isinstance(name, bytes) else str(name)
            line["probability"] = round(float(outputs["probabilities"][i][k]), 6)
        out.append(line)
    return out


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


async def predict_grpc(config: PredictConfig, args: argparse.Namespace
                       ) -> tuple[ModelContract, dict[str, np.ndarray], Rows]:
    async with Client(config.grpc, token=config.token, timeout=config.timeout_s) as client:
        contract = ModelContract.from_metadata(metadata_dict(await client.metadata(config.model)))
        rows = rows_for(args, contract)
        outputs = await client.infer(config.model, rows.values, contract.outputs, input_name=rows.input_name)
        return contract, outputs, rows


def predict_http(config: PredictConfig, args: argparse.Namespace
                 ) -> tuple[ModelContract, dict[str, np.ndarray], Rows]:
    headers = {"authorization": f"Bearer {config.token}"} if config.token else {}
    with httpx.Client(base_url=str(config.http), headers=headers, timeout=config.timeout_s) as http:
        contract = ModelContract.from_metadata(_ok(http.get(f"/v2/models/{config.model}")))
        rows = rows_for(args, contract)
        if rows.input_name == "image":  # files as base64 strings, the protocol's way to carry bytes in JSON
            tensor = {"name": "image", "shape": [len(rows.values)], "datatype": "BYTES",
                      "parameters": {"content_type": "base64"},
                      "data": [base64.b64encode(v).decode() for v in rows.values]}
        else:
            tensor = {"name": "input", "shape": list(rows.values.shape), "datatype": "FP32",
                      "data": rows.values.ravel().tolist()}
        body = {"inputs": [tensor], "outputs": [{"name": name} for name in contract.outputs]}
        answer = _ok(http.post(f"/v2/models/{config.model}/infer", json=body))
    outputs = {o["name"]: np.asarray(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"])
               for o in answer["outputs"]}
    return contract, outputs, rows


def _ok(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.json().get('error', response.text)}")
    return response.json()
