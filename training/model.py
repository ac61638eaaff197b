"""The built-in model, the digits demo's: trained by `training/`, shipped verbatim inside its TorchServe archive,
and rebuilt there by the factory "training.model:build_convnet" (handlers/factory.py), as any user's model is.

This file imports nothing but torch, so the handler can rebuild the module from the archive alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

NORMS = ("batch", "group", "layer")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; saved in every checkpoint and archive manifest."""

    in_channels: int = 1
    height: int = 8
    width: int = 8
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)
    norm: str = "batch"
    dropout: float = 0.1
    # Extra classification/regression heads for multi-task models: name -> output size.
    extra_heads: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.channels:
            raise ValueError("channels must name at least one conv block width")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "extra_heads", dict(self.extra_heads))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{**d, "channels": tuple(d.get("channels", cls.channels))})


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Up to 8 groups that divide the channel count.
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    # "layer": normalise over (C, H, W) per sample; GroupNorm with one group is exactly that.
    return nn.GroupNorm(1, channels)


class ConvNet(nn.Module):
    """Conv -> Norm -> ReLU blocks, global average pool, a linear head per task."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.channels:
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                make_norm(config.norm, c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.trunk = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, config.num_classes)
        self.extra_heads = nn.ModuleDict({n: nn.Linear(c_in, k) for n, k in config.extra_heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.trunk(x))  # (B, C_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's output, keyed by task name ("label" is the main classification head)."""
        h = self.features(x)
        out = {"logits": self.head(h)}
        out.update({name: head(h) for name, head in self.extra_heads.items()})
        return out


def build_model(config: ModelConfig | dict[str, Any]) -> ConvNet:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return ConvNet(config)


def build_convnet(in_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] | list[int] = (32, 64),
                  norm: str = "batch", dropout: float = 0.0, extra_heads: dict[str, int] | None = None) -> ConvNet:
    """The factory of the built-in ConvNet: images of `in_shape` (C, H, W) -> `num_classes` logits (and one more
    head per entry of `extra_heads`, for multi-task training)."""
    if len(in_shape) != 3:
        raise ValueError(f"the built-in ConvNet takes images (C, H, W), got in_shape {tuple(in_shape)}; "
                         "for tables give model.factory a model of your own (e.g. an MLP)")
    c, h, w = (int(v) for v in in_shape)
    return ConvNet(ModelConfig(in_channels=c, height=h, width=w, num_classes=num_classes, channels=tuple(channels),
                               norm=norm, dropout=dropout, extra_heads=dict(extra_heads or {})))
