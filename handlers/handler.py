"""TorchServe custom handler: validate each request on its own, run the valid ones in one eval-mode forward.

Requests and responses are `handlers.codec` messages (see ARCHITECTURE.md); this file knows no transport.
The archive ships it beside `handlers/codec.py`, `handlers/manifest.py`, `training/model.py`, `weights.pt` and
`gradserve.json`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers import codec
from handlers.manifest import InvalidRows, Manifest, validate_rows
from training.model import build_model

logger = logging.getLogger(__name__)

# A request is either its validated input rows or the error payload that answers it.
Parsed = np.ndarray | bytes


class DigitsHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = Manifest.read(model_dir)
        weights = model_dir / self.manifest.weights_file
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != self.manifest.weights_sha256:
            raise RuntimeError(f"{weights.name} has sha256 {digest}, the manifest says "
                               f"{self.manifest.weights_sha256}: refusing weights that were altered; repackage")

        gpu_id = props.get("gpu_id")
        use_cuda = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        # Workers of one model share the cores: workers x threads must not oversubscribe them. A small model
        # runs fastest on one thread (OpenMP's spinning costs more than it gains); model-config.yaml's
        # handler.torch_threads says how many, capped by that share.
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        share = max(1, len(os.sched_getaffinity(0)) // max(1, int(yaml_config.get("maxWorkers", 1))))
        wanted = (yaml_config.get("handler") or {}).get("torch_threads") or share
        torch.set_num_threads(min(int(wanted), share))

        model = build_model(self.manifest.model_config)
        model.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
        self.model = model.to(self.device).eval()
        if any(m.training for m in self.model.modules()):
            raise RuntimeError("a module is still in training mode after eval()")

        self.batch_sizes: Counter[int] = Counter()  # requests per handle() call, as TorchServe batched them
        with torch.inference_mode():
            self.model(torch.zeros((2, *self.manifest.input.row_shape), device=self.device))  # warm-up
        self.initialized = True
        logger.info("gradserve handler ready: %s v%s on %s, %d threads, model code %s", self.manifest.name,
                    self.manifest.version, self.device, torch.get_num_threads(), inspect.getfile(build_model))

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        self.context = context
        parsed = self.preprocess(data)
        rows = [p for p in parsed if isinstance(p, np.ndarray)]
        self.batch_sizes[len(data)] += 1
        logger.info("gradserve batch: %d requests, %d rows", len(data), sum(len(r) for r in rows))
        if not rows:
            return [p for p in parsed if isinstance(p, bytes)]
        x = torch.from_numpy(np.concatenate(rows))  # (N, C, H, W): the one copy of the inputs
        answers = iter(self.postprocess(self.inference(x), [len(r) for r in rows]))
        return [next(answers) if isinstance(p, np.ndarray) else p for p in parsed]

    def preprocess(self, data: list[dict[str, Any]]) -> list[Parsed]:
        return [self._validate(request) for request in data]

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The class head as logits/label/probabilities, and every extra head (multi-task) by its name."""
        with torch.inference_mode():
            heads = self.model.forward_all(data.to(self.device, non_blocking=True))  # {"logits": (N, K), ...}
            logits = heads.pop("logits")
            return {"logits": logits, "label": logits.argmax(dim=1), "probabilities": logits.softmax(dim=1), **heads}

    def postprocess(self, data: dict[str, torch.Tensor], row_counts: Sequence[int] = ()) -> list[bytes]:
        """Split the batch's outputs back into one encoded response per request of `row_counts` rows."""
        arrays = {name: t.cpu().numpy() for name, t in data.items()}
        ends = list(accumulate(row_counts or [len(arrays["label"])]))
        return [codec.encode({name: a[start:end] for name, a in arrays.items()})  # row slices are views
                for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def _validate(self, request: dict[str, Any]) -> Parsed:
        payload = request.get("data") or request.get("body")
        if not isinstance(payload, bytes | bytearray):
            return self._invalid("the request must carry a handlers.codec message as raw bytes "
                                 f"in 'data' or 'body', got {type(payload).__name__}")
        try:
            message = codec.decode(payload)
            return validate_rows(self.manifest, message.tensors)[1]
        except (codec.CodecError, InvalidRows) as e:
            return self._invalid(str(e))

    @staticmethod
    def _invalid(message: str) -> bytes:
        return codec.encode_error(codec.INVALID_ARGUMENT, message)
