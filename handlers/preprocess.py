"""How what a user has becomes the model's input tensor: the same code in training and in the handler (it
ships inside every archive).

- Images: an encoded file (PNG, JPEG, BMP, GIF, WebP, ...) is decoded, converted to the configured Pillow mode
  ("L", "RGB", ...) and resized to the configured size, then scaled to [0, 1]: float32 (C, H, W).
- Tables: a row of raw feature values, float32 (F,).
- Then standardisation with the training split's statistics: per channel for images, per feature for tables
  (`Preprocess.standardize`); regression targets are learnt standardised and served in their own units
  (`Preprocess.unstandardize_target`).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Channels of the Pillow modes an image model may be trained in.
MODES = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3}
MAX_IMAGE_PIXELS = 40_000_000  # a larger image is refused before it is decoded (decompression bombs)


class ImageError(ValueError):
    """The bytes are not an image this decoder accepts; the message says why."""


def load_image(data: bytes, size: Sequence[int], mode: str) -> np.ndarray:
    """An encoded image file as float32 (C, H, W) in [0, 1]: decoded, converted to `mode`, resized to `size`
    (height, width). Refuses, with ImageError, bytes that are not an image, truncated files, and images over
    MAX_IMAGE_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image of {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}; "
                                 "resize it before sending")
            image = image.convert(mode).resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can decode (PNG, JPEG, BMP, GIF, WebP, TIFF, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"refused as a decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"a corrupt or truncated image: {e}") from None
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class Preprocess:
    """The input contract of a model and the statistics of its training split; saved in checkpoints and in
    the archive's manifest."""

    kind: str  # "image" | "table"
    in_shape: tuple[int, ...]  # (C, H, W) or (F,)
    mode: str = ""  # images: the Pillow mode files are converted to
    mean: tuple[float, ...] = ()  # per channel or feature; () for none (the digits demo)
    std: tuple[float, ...] = ()
    feature_names: tuple[str, ...] = ()  # tables: the columns, in order
    target_mean: tuple[float, ...] = ()  # regression: the targets' statistics
    target_std: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the digits' pixel scale

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image file as the model's unstandardised input row (C, H, W)."""
        if self.kind != "image":
            raise ImageError("this model takes table rows, not images")
        return load_image(data, self.in_shape[1:], self.mode)

    def standardize(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """(N, *in_shape) raw inputs -> what the model sees; `inplace` overwrites x (the same arithmetic, no new
        tensor: for a big batch, a fresh one costs more in page faults than the arithmetic)."""
        if not self.mean:
            return x
        mean, std = self._stats(self.mean, x), self._stats(self.std, x)
        return x.sub_(mean).div_(std) if inplace else (x - mean) / std

    def standardize_target(self, y: torch.Tensor) -> torch.Tensor:
        if not self.target_mean:
            return y
        return (y - torch.tensor(self.target_mean, dtype=y.dtype, device=y.device)) / torch.tensor(
            self.target_std, dtype=y.dtype, device=y.device)

    def unstandardize_target(self, y: torch.Tensor) -> torch.Tensor:
        """The model's (N, T) output -> predictions in the targets' own units."""
        if not self.target_mean:
            return y
        return y * torch.tensor(self.target_std, dtype=y.dtype, device=y.device) + torch.tensor(
            self.target_mean, dtype=y.dtype, device=y.device)

    def _stats(self, values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
        shape = (len(values), *([1] * (len(self.in_shape) - 1)))  # per channel: (C, 1, 1); per feature: (F,)
        return _stat_tensor(values, shape, x.dtype, x.device)

    def describe(self) -> str:
        """The input contract in words (ModelMetadata, the README of an archive)."""
        if self.kind == "image":
            c, h, w = self.in_shape
            words = (f"images: encoded files (BYTES 'image'), or pixels as FP32 'input' [n, {c}, {h}, {w}] "
                     f"in mode {self.mode} scaled to [0, 1] after resizing to {h}x{w}")
        else:
            words = f"table rows: FP32 'input' [n, {self.in_shape[0]}] of raw feature values"
            if self.feature_names:
                words += f" ({', '.join(self.feature_names)})"
        return words + ("; standardised with the training split's statistics by the server" if self.mean else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_shape": list(self.in_shape), "mode": self.mode, "mean": list(self.mean),
                "std": list(self.std), "feature_names": list(self.feature_names),
                "target_mean": list(self.target_mean), "target_std": list(self.target_std), "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(kind=str(d["kind"]), in_shape=tuple(int(v) for v in d["in_shape"]), mode=str(d.get("mode", "")),
                   mean=tuple(d.get("mean", ())), std=tuple(d.get("std", ())),
                   feature_names=tuple(d.get("feature_names", ())), target_mean=tuple(d.get("target_mean", ())),
                   target_std=tuple(d.get("target_std", ())), extra=dict(d.get("extra") or {}))


def statistics(x: np.ndarray | torch.Tensor, per: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) over the rows of x, per channel ("image", x (N, C, H, W)) or per feature ("table", x (N, F));
    a constant column gets std 1 so that standardising leaves it at 0 rather than dividing by zero."""
    t = torch.as_tensor(x, dtype=torch.float64)
    dims = (0, 2, 3) if per == "image" else (0,)
    mean, std = t.mean(dim=dims), t.std(dim=dims, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@functools.lru_cache(maxsize=64)
def _stat_tensor(values: tuple[float, ...], shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Statistics as a tensor, made once per dtype and device instead of on every call (3% of a single-row call of
    the images example in the handler); never an inference tensor, so training's autograd may use it too."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(shape)
