"""PyTriton 0.7.0 (the Triton Inference Server it bundles) serving an archive's model (bench/peers/model.py) over
the Open Inference Protocol v2, REST and gRPC, with Triton's dynamic batching: batches of 32 rows preferred,
2 ms at most in the queue. Triton's max_batch_size also caps the rows of one request, so it is 256 (the bench's
largest request), and the preferred size keeps single-row batches at 32.

    bench/.peers/triton/bin/python -m bench.peers.triton_peer --model-dir DIR --name digits \
        --http-port 8000 --grpc-port 8001 --metrics-port 8002 --workdir WORK
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.model import PeerModel, peer_arguments

PREFERRED_BATCH = 32
MAX_QUEUE_DELAY_US = 2000
MAX_BATCH_SIZE = 256  # rows of one request at most, too (the bench's 256-row requests)


def serve(model: PeerModel, name: str, config: TritonConfig) -> None:
    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 - the model's input is called `input`
        return {model.output: model.predict(input)}

    with Triton(config=config) as triton:
        triton.bind(model_name=name, infer_func=infer,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=model.row_shape)],
                    outputs=[Tensor(name=model.output, dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(
                        max_queue_delay_microseconds=MAX_QUEUE_DELAY_US, preferred_batch_size=[PREFERRED_BATCH])))
        triton.serve()


def main(argv: list[str] | None = None) -> int:
    args = peer_arguments(__doc__.split("\n\n")[0], argv)
    # Triton's Python backend stub links libpython3.11.so: this interpreter's, not another one the loader finds
    # first (a system Python of another patch level fails inside multiprocessing with this one's stdlib).
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0)
    serve(PeerModel.load(args.model_dir, args.threads), args.name, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
