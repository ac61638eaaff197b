"""A model's forward compiled for CPU inference, when its archive asks for it (`package.optimize`): traced, frozen
and optimized by TorchScript (`torch.jit.optimize_for_inference`: each BatchNorm folded into the convolution
before it, convolutions on oneDNN's blocked layout). The images example's CNN: the handler's rows/s at 16 to 256
rows on one thread 2.7-3.6x the eager module's (bench/results/2026-11-30-handler-optimize.txt).

Tracing records the operations one input took, so a forward whose Python code branches on its input's values
would be wrong for others: the compiled forward is used only if it answers as the eager model does, within
`TOLERANCE`, on random rows of several batch sizes; otherwise (or if tracing fails) the eager module serves, and
the reason is logged. A multi-task model is compiled with all its heads (`forward_all`); GPUs keep the eager
module.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5  # absolute, on each output value: what the handler's answers promise against the eager model
CHECK_ROWS = (1, 3, 17)  # batch sizes the compiled forward is checked at (the trace itself runs 2)

Outputs = dict[str, torch.Tensor]


class Heads(torch.nn.Module):
    """Every output of a model by name: its `forward_all` (a multi-task model), else {"logits": its forward}."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Outputs:
        forward_all = getattr(self.model, "forward_all", None)
        return forward_all(x) if callable(forward_all) else {"logits": self.model(x)}


def for_inference(model: torch.nn.Module, in_shape: tuple[int, ...], device: torch.device,
                  optimize: bool = True) -> tuple[torch.nn.Module, str]:
    """The forward to serve `model` (in eval mode) with, every output by name, and what it is, in words for the
    log: compiled where `optimize` asks and it answers as the eager model does."""
    heads = Heads(model).eval()
    if not optimize:
        return heads, "eager"
    if device.type != "cpu":
        return heads, "eager (compiled forwards are for CPUs)"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript says it is deprecated (torch 2.13) for torch.compile, which needs a C++ compiler on the
            # serving machine and compiles again for new batch sizes; the tracer's warnings are what the check
            # below decides on.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(heads, torch.rand((2, *in_shape)), check_trace=False, strict=False)
            compiled = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            worst = 0.0
            for rows in CHECK_ROWS:
                x = torch.rand((rows, *in_shape))
                expected, got = heads(x), compiled(x)
                if not isinstance(got, dict) or set(got) != set(expected) or any(
                        got[k].shape != v.shape for k, v in expected.items()):
                    return heads, "eager (the compiled forward answered other outputs than the model)"
                worst = max([worst, *((got[k] - v).abs().max().item() for k, v in expected.items())])
    except Exception as e:  # noqa: BLE001 - whatever tracing a user's model raises, the eager module still serves
        logger.warning("serving the eager model: compiling its forward failed (%s: %s)", type(e).__name__, e)
        return heads, f"eager (compiling failed: {type(e).__name__})"
    if not worst <= TOLERANCE:
        logger.warning("serving the eager model: its compiled forward differs from it by %.2g (more than %g): "
                       "its code likely depends on its input's values", worst, TOLERANCE)
        return heads, f"eager (the compiled forward differed by {worst:.2g})"
    return compiled, f"compiled for inference (TorchScript, within {worst:.1g} of the eager model)"
