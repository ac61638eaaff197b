"""TorchServe custom handler: validate each request on its own, run the valid ones in one eval-mode forward.

Requests and responses are `handlers.codec` messages (see ARCHITECTURE.md); this file knows no transport.
The archive ships it beside the handlers/ modules it imports (training/package.py's HANDLER_MODULES), the model's
code (training/model.py for the built-in ConvNet, or the user's module or package), `weights.pt` and
`gradserve.json`. A request carries exactly one of the model's inputs: `input` (the preprocessed tensor) or, for
an image model, `image` (one encoded file per row, decoded and resized here exactly as in training); an element
that does not decode fails its own request and no other.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers import codec, sharedmem
from handlers.factory import BUILTIN, ModelSpec, forget_foreign
from handlers.manifest import InvalidRows, Manifest, validate_rows
from handlers.optimize import for_inference
from handlers.preprocess import ImageError, Preprocess
from handlers.threads import Threads

logger = logging.getLogger(__name__)
# Set by the front door's TorchServe launcher (server/torchserve/process.py), whose log configuration drops the
# metric line TorchServe's worker prints for every call; the front door keeps its own metrics.
QUIET_METRICS_ENV = "GRADSERVE_QUIET_WORKER_METRICS"
# The line TorchServe's worker logs (root logger, INFO) for every call it receives; the JVM reads it from the
# worker's stdout and writes it to model_log.log.
RECEIVED_LINE = "Backend received inference at: %d"
# The input buffer a worker keeps for its next call (handle's _gather), at most: bigger calls get their own.
KEEP_BYTES = 64 * 1024 * 1024


# A request is either its rows and the outputs it wants (the model's input tensor, unstandardised; None: all
# outputs), or the error payload that answers it. No class of our own here: TorchServe refuses a handler module
# with more than one.
Rows = tuple[np.ndarray, tuple[str, ...] | None]
Parsed = Rows | bytes


class GradserveHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = Manifest.read(model_dir)
        verify(model_dir, self.manifest)
        gpu_id = props.get("gpu_id")
        use_cuda = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        if use_cuda:  # float32 means float32: with TF32 convolutions the H200 answered 3.5-4.6e-4 from the CPU
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        settings = yaml_config.get("handler") or {}
        self.threads = Threads.from_config(yaml_config)
        torch.set_num_threads(self.threads.most)

        if str(model_dir) not in sys.path:  # the archive's root: the model's code (TorchServe puts it there too)
            sys.path.insert(0, str(model_dir))
        spec = ModelSpec.from_dict(self.manifest.model_config)
        if spec.factory != BUILTIN:  # this archive's module, not one of the same name another archive loaded
            forget_foreign((spec.factory,), model_dir)
        model = spec.build()
        weights = model_dir / self.manifest.weights_file
        model.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
        self.model = model.to(self.device).eval()
        if any(m.training for m in self.model.modules()):
            raise RuntimeError("a module is still in training mode after eval()")
        self.transform = Preprocess.from_dict(self.manifest.preprocess)  # the input contract and its statistics
        self.class_names = np.array([name.encode() for name in self.manifest.labels], dtype=object)
        self.batch_sizes: Counter[int] = Counter()  # requests per handle() call, as TorchServe batched them
        # Each thread's calls gather their inputs in its own buffer (_gather): TorchServe makes one call at a time,
        # but a local batch job calls one handler from several threads at once.
        self._mine = threading.local()
        if os.environ.get(QUIET_METRICS_ENV) == "1":  # not printed at all: 5-7% of a worker's CPU on single rows
            logging.getLogger("ts.metrics").setLevel(logging.WARNING)
            logging.getLogger().addFilter(_not_per_call)
        # every output by name from one forward: eager, or compiled where the archive asks (package.optimize)
        self.forward, self.forward_kind = for_inference(self.model, self.transform.in_shape, self.device,
                                                        optimize=bool(settings.get("optimize")))
        with torch.inference_mode():
            self.forward(torch.zeros((2, *self.transform.in_shape), device=self.device))  # warm-up
        self.initialized = True
        logger.info("gradserve handler ready: %s v%s (%s) on %s, %d threads for calls of %d rows or more (1 "
                    "below), forward %s, model code %s", self.manifest.name, self.manifest.version,
                    self.manifest.task, self.device, self.threads.most, self.threads.parallel_rows, self.forward_kind,
                    inspect.getfile(type(self.model)))

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        self.context = context
        parsed = self.preprocess(data)
        valid = [p for p in parsed if isinstance(p, tuple)]
        if not self.batch_sizes[len(data)]:  # a line per new batch size, not per request
            logger.info("gradserve batch: first call with %d requests (%d rows)", len(data),
                        sum(len(rows) for rows, _ in valid))
        self.batch_sizes[len(data)] += 1
        if not valid:
            return [p for p in parsed if isinstance(p, bytes)]
        x = self._gather([rows for rows, _ in valid])  # (N, *in_shape): the one copy of the inputs
        wants = [outputs for _, outputs in valid]  # the call computes what any of its requests wants
        wanted = None if None in wants else sorted({name for outputs in wants for name in outputs or ()})
        outputs = self.inference(x, wanted)
        self._mine.gathered = None  # a call bigger than KEEP_BYTES had a buffer of its own: not kept till the next
        answers = iter(self.postprocess(outputs, [len(rows) for rows, _ in valid]))
        return [next(answers) if isinstance(p, tuple) else p for p in parsed]

    def preprocess(self, data: list[dict[str, Any]]) -> list[Parsed]:
        return [self._parse(request) for request in data]

    def inference(self, data: torch.Tensor, outputs: Sequence[str] | None = None, *args: Any,
                  **kwargs: Any) -> dict[str, torch.Tensor | np.ndarray]:
        """The model's outputs for the task, those of `outputs` only (None, or no name the model has: all):
        classification logits/label/probabilities/class_name (and every extra head of a multi-task model by its
        name); regression `prediction` in the targets' own units."""
        self.threads.use(len(data))
        with torch.inference_mode():
            x = data.to(self.device, non_blocking=True)
            x = self.transform.standardize(x, inplace=x is not data or data is self._gathered())  # never a caller's
            heads = self._forward(x)  # {"logits": (N, K), ...}
            out = heads.pop("logits")
            if self.manifest.task == "regression":
                return {"prediction": self.transform.unstandardize_target(out.float())}
            label = out.argmax(dim=1)
            every = {"logits": lambda: out, "label": lambda: label, "probabilities": lambda: out.softmax(dim=1),
                     "class_name": lambda: self.class_names[label.cpu().numpy()],
                     **{name: (lambda head=head: head) for name, head in heads.items()}}
            wanted = set(every) & set(outputs or ()) or set(every)
            return {name: make() for name, make in every.items() if name in wanted}

    def _gather(self, parts: list[np.ndarray]) -> torch.Tensor:
        """The requests' rows as one tensor in a buffer this thread keeps across calls (up to KEEP_BYTES), pinned
        on a GPU so that the copy to the device runs at full speed. A fresh tensor per call cost more than the copy:
        standardising ResNet's 1024-row calls out of place took 36 ms, in place 2.5 (2 cores)."""
        n, first = sum(len(p) for p in parts), parts[0]
        rows = getattr(self._mine, "rows", None)
        if rows is None or len(rows) < n or rows.shape[1:] != first.shape[1:] or rows.dtype != first.dtype:
            dtype = torch.from_numpy(first[:0].copy()).dtype
            rows = torch.empty((n, *first.shape[1:]), dtype=dtype, pin_memory=self.device.type == "cuda").numpy()
            if rows.nbytes <= KEEP_BYTES:
                self._mine.rows = rows
        out = rows[:n]
        np.concatenate(parts, out=out)
        self._mine.gathered = torch.from_numpy(out)
        return self._mine.gathered

    def _gathered(self) -> torch.Tensor | None:
        return getattr(self._mine, "gathered", None)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's output (a multi-task model's forward_all), in chunks of the archive's forward_rows, the
        batch size this model runs fastest at on the packaging machine's CPU (measured by `gradserve package`); on
        a GPU, in one forward."""
        step = (self.manifest.forward_rows if self.device.type == "cpu" else None) or len(x)
        parts = [self.forward(c) for c in x.split(step)]
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def postprocess(self, data: dict[str, Any], row_counts: Sequence[int] = ()) -> list[bytes]:
        """Split the batch's outputs back into one encoded response per request of `row_counts` rows."""
        arrays = {name: t.cpu().numpy() if isinstance(t, torch.Tensor) else t for name, t in data.items()}
        ends = list(accumulate(row_counts or [len(next(iter(arrays.values())))]))
        return [codec.encode({name: a[start:end] for name, a in arrays.items()})  # row slices are views
                for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def _parse(self, request: dict[str, Any]) -> Parsed:
        payload = request.get("data") or request.get("body")
        if not isinstance(payload, bytes | bytearray):
            return _invalid("the request must carry a handlers.codec message as raw bytes "
                            f"in 'data' or 'body', got {type(payload).__name__}")
        try:
            message = codec.decode(payload)
            if message.ref is not None:  # a large request the front door left in shared memory
                message = codec.decode(sharedmem.load(message.ref.path, message.ref.nbytes))
            name, x = validate_rows(self.manifest, message.tensors)
            return self._images(x) if name == "image" else x, message.outputs
        except (codec.CodecError, sharedmem.PayloadRefError, InvalidRows, ImageError) as e:
            return _invalid(str(e))

    def _images(self, files: np.ndarray) -> np.ndarray:
        """Encoded image files -> (N, C, H, W) pixels in [0, 1], as training read them."""
        rows = []
        for i, data in enumerate(files):
            try:
                rows.append(self.transform.decode(data))
            except ImageError as e:
                raise ImageError(f"image {i} of the request: {e}") from None
        return np.stack(rows)


def _not_per_call(record: logging.LogRecord) -> bool:
    """False for TorchServe's line per call: neither printed by the worker nor read and written by the JVM."""
    return record.msg != RECEIVED_LINE


def _invalid(message: str) -> bytes:
    return codec.encode_error(codec.INVALID_ARGUMENT, message)


def verify(model_dir: Path, manifest: Manifest) -> None:
    """Refuse weights or model code that are not what was packaged (their sha256 is in the manifest)."""
    for relative, expected in {manifest.weights_file: manifest.weights_sha256, **manifest.code}.items():
        path = model_dir / relative
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != expected:
            what = "weights" if relative == manifest.weights_file else "model code"
            raise RuntimeError(f"{relative} has sha256 {digest}, the manifest says {expected}: refusing {what} that "
                               "were altered; repackage")
