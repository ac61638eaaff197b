"""KServe 0.21.0's Python model server serving an archive's model (bench/peers/model.py) over the Open
Inference Protocol v2, REST and gRPC, with no batching (KServe's Python server has none): one request, one
forward. Its per-request log lines (latency, access) are off, as gradserve's TorchServe request lines are.

    bench/.peers/kserve/bin/python -m bench.peers.kserve_peer --model-dir DIR --name digits \
        --http-port 8080 --grpc-port 8081 --metrics-port 0 --workdir WORK
"""

from __future__ import annotations

import logging
from pathlib import Path

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve import model_server as kserve_model_server

from bench.peers.model import PeerModel, peer_arguments
from handlers.threads import Threads

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC messages, as the front door's (KServe's default, 8 MiB, refuses a
#                                       256-row request of a 3x64x64 model)


class GradserveKServeModel(kserve.Model):
    """One input `input` FP32 [-1, *row_shape], one output (`logits`) FP32 [-1, K]."""

    def __init__(self, name: str, model_dir: Path, threads: Threads) -> None:
        super().__init__(name)
        self.model_dir, self.threads = model_dir, threads

    def load(self) -> bool:
        self.model = PeerModel.load(self.model_dir, self.threads)
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        y = self.model.predict(payload.inputs[0].as_numpy())
        output = InferOutput(name=self.model.output, shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=bool(payload.from_grpc))  # raw over gRPC, JSON over REST
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])


def main(argv: list[str] | None = None) -> int:
    args = peer_arguments(__doc__.split("\n\n")[0], argv)
    model = GradserveKServeModel(args.name, args.model_dir, args.threads)
    model.load()
    # KServe reads these from its own command line, parsed when it was imported; its gRPC server reads them here.
    kserve_model_server.args.grpc_max_send_message_length = MAX_MESSAGE_BYTES
    kserve_model_server.args.grpc_max_receive_message_length = MAX_MESSAGE_BYTES
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                                enable_latency_logging=False)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
