"""MLServer 1.7.1 serving an archive's model (bench/peers/model.py) over the Open Inference Protocol v2, with
adaptive batching (at most 32 requests per batch, 5 ms at most to fill one); everything else as MLServer ships
(one parallel inference worker process), but debug off (no access log), as in production.

    bench/.peers/mlserver/bin/python -m bench.peers.mlserver_peer --model-dir DIR --name digits \
        --http-port 8080 --grpc-port 8081 --metrics-port 8082 --workdir WORK

Writes WORK/mlserver/{settings,model-settings}.json and becomes `mlserver start WORK/mlserver`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers.model import PeerModel, peer_arguments
from handlers.manifest import Manifest
from handlers.threads import Threads

MAX_BATCH_SIZE = 32
MAX_BATCH_TIME_S = 0.005
MiB = 1024 * 1024


class GradserveRuntime(MLModel):
    """One input `input` FP32 [-1, *row_shape], one output (`logits`) FP32 [-1, K]."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        assert parameters is not None and parameters.uri is not None
        extra = parameters.extra or {}
        self.model = PeerModel.load(Path(parameters.uri), Threads(int(extra.get("threads", 1)),
                                                                  int(extra.get("parallel_rows", 0))))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.model.predict(x)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self.model.output, y)])


def settings(args: argparse.Namespace, row_shape: list[int]) -> tuple[dict, dict]:
    server = {"debug": False, "host": "127.0.0.1", "http_port": args.http_port, "grpc_port": args.grpc_port,
              "metrics_port": args.metrics_port, "grpc_max_message_length": 64 * MiB,
              "metrics_dir": str(args.workdir / ".metrics"), "environments_dir": str(args.workdir / ".envs")}
    model = {"name": args.name, "implementation": "bench.peers.mlserver_peer.GradserveRuntime",
             "max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MAX_BATCH_TIME_S,
             "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *row_shape]}],
             "parameters": {"uri": str(args.model_dir), "extra": {"threads": args.threads.most,
                                                                   "parallel_rows": args.threads.parallel_rows}}}
    return server, model


def main(argv: list[str] | None = None) -> int:
    args = peer_arguments(__doc__.split("\n\n")[0], argv)
    server, model = settings(args, list(Manifest.read(args.model_dir).input.row_shape))
    folder = args.workdir / "mlserver"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(server))
    (folder / "model-settings.json").write_text(json.dumps(model))
    mlserver = Path(sys.executable).parent / "mlserver"
    os.execv(mlserver, [str(mlserver), "start", str(folder)])
    return 0  # not reached: the process is MLServer now


if __name__ == "__main__":
    raise SystemExit(main())
