"""The model every peer serves: an archive's own model and preprocessing, rebuilt from the unpacked archive as
the handler rebuilds it (handlers/factory.py's ModelSpec, the manifest's weights and standardisation), in eval
mode under inference_mode. It imports torch, numpy and handlers/ only: it runs in the peers' venvs.

    model = PeerModel.load(Path("unpacked-archive"), Threads(most=2, parallel_rows=128))
    logits = model.predict(x)          # x: float32 [n, *row_shape] -> float32 [n, K]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from handlers.factory import BUILTIN, ModelSpec, forget_foreign
from handlers.manifest import Manifest
from handlers.preprocess import Preprocess
from handlers.threads import Threads


@dataclass
class PeerModel:
    manifest: Manifest
    module: nn.Module
    transform: Preprocess
    threads: Threads

    @classmethod
    def load(cls, model_dir: Path, threads: Threads) -> PeerModel:
        """The model of an unpacked archive, on the threads its handler would use (handlers/threads.py)."""
        torch.set_num_threads(threads.most)
        manifest = Manifest.read(model_dir)
        if str(model_dir) not in sys.path:  # the model's code, as the archive carries it
            sys.path.insert(0, str(model_dir))
        spec = ModelSpec.from_dict(manifest.model_config)
        if spec.factory != BUILTIN:
            forget_foreign((spec.factory,), model_dir)
        module = spec.build()
        module.load_state_dict(torch.load(model_dir / manifest.weights_file, map_location="cpu", weights_only=True))
        model = cls(manifest, module.eval(), Preprocess.from_dict(manifest.preprocess), threads)
        model.predict(np.zeros((2, *manifest.input.row_shape), dtype=np.float32))  # warm-up
        return model

    @property
    def output(self) -> str:
        """The one output a peer returns: a classifier's logits, a regressor's prediction."""
        return self.manifest.outputs[0].name

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.manifest.input.row_shape

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, *row_shape] raw inputs -> float32 [n, K]: standardised, forward, a regressor's targets
        back in their own units."""
        self.threads.use(len(x))
        with torch.inference_mode():
            out = self.module(self.transform.standardize(torch.from_numpy(np.ascontiguousarray(x, np.float32))))
            if self.manifest.task == "regression":
                out = self.transform.unstandardize_target(out)
        return out.numpy()


def peer_arguments(description: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line bench/peer_stacks.py starts every peer with."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", type=Path, required=True, help="the unpacked archive")
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True, help="where the peer has a port of its own")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for calls of --parallel-rows or more")
    parser.add_argument("--parallel-rows", dest="parallel_rows", type=int, default=0,
                        help="smaller calls run on one thread (0: every call on --threads)")
    args = parser.parse_args(argv)
    args.threads = Threads(args.threads, args.parallel_rows)
    return args
