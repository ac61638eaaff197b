"""handlers/optimize.py: a model's forward compiled for CPU inference is served only where it answers as the eager
model does; otherwise the eager model serves, with the reason."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from handlers.optimize import TOLERANCE, Heads, for_inference

CPU = torch.device("cpu")


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():  # running statistics a trained model would have, so folding them changes the weights
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


class LeavesTorch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy().copy()).flatten(1)  # the trace keeps its example's values as a constant


class BatchSizeBranch(nn.Module):
    """Code that branches on its input: a trace keeps the branch its example took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * 2 if x.shape[0] > 2 else x.flatten(1) * 3


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> list[object]:
        return [x.flatten(1), "a note"]  # the tracer records tensors only


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.other = conv_bn()[:5], nn.Linear(128, 5), nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.head(h), "other": self.other(h)}


@pytest.mark.parametrize(("model", "outputs"), [(conv_bn(), {"logits"}), (MultiTask().eval(), {"logits", "other"})])
def test_a_conv_batchnorm_model_is_compiled_and_answers_as_the_eager_one_at_any_batch_size(
        model: nn.Module, outputs: set[str]) -> None:
    forward, how = for_inference(model, (3, 8, 8), CPU)
    assert isinstance(forward, torch.jit.ScriptModule) and how.startswith("compiled")
    with torch.inference_mode():
        x = torch.rand((40, 3, 8, 8))
        whole, eager = forward(x), Heads(model)(x)
        assert set(whole) == set(eager) == outputs
        for name in outputs:
            assert (whole[name] - eager[name]).abs().max() <= TOLERANCE
            for i in (0, 7, 39):  # a row alone gets what it got among the others
                assert (forward(x[i:i + 1])[name] - whole[name][i:i + 1]).abs().max() <= TOLERANCE


@pytest.mark.parametrize(("model", "reason"), [
    (BatchSizeBranch(), "differed by"), (LeavesTorch(), "other outputs"), (Untraceable(), "compiling failed")])
def test_a_model_the_compiled_forward_would_get_wrong_is_served_eager_and_says_why(
        model: nn.Module, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        forward, how = for_inference(model, (2, 2), CPU)
    assert isinstance(forward, Heads) and forward.model is model and how.startswith("eager") and reason in how
    if reason != "other outputs":
        assert "serving the eager model" in caplog.text


def test_without_optimize_every_model_is_served_eager() -> None:
    forward, how = for_inference(conv_bn(), (3, 8, 8), CPU, optimize=False)
    assert isinstance(forward, Heads) and how == "eager"


def test_a_gpu_model_is_served_eager() -> None:
    model = conv_bn()
    forward, how = for_inference(model, (3, 8, 8), torch.device("cuda", 0))
    assert isinstance(forward, Heads) and forward.model is model and "CPU" in how
