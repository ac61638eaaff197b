"""Data: scikit-learn's bundled digits (no download), a seeded stratified split, and shuffled batches.

Everything here takes images of any shape C x H x W; only `load_digits_splits` knows about digits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGITS_SCALE = 1 / 16  # digits pixels are integers 0..16


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64 class index

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    labels: tuple[str, ...]
    dataset: str = "custom"
    scale: float = 1.0  # what raw pixels were multiplied by to land in [0, 1]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def describe(self) -> dict[str, object]:
        """The `data` entry of every checkpoint: enough to feed the model the way it was trained."""
        return {"dataset": self.dataset, "shape": list(self.shape), "labels": list(self.labels), "scale": self.scale}


def split_stratified(
    x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Split, Split, Split]:
    """Seeded train/val/test split that keeps every class's share the same in each part."""
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    val_share = val_fraction / (1 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, stratify=y_rest, random_state=seed
    )

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.int64))

    return split(x_train, y_train), split(x_val, y_val), split(x_test, y_test)


def make_splits(
    x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, dataset: str = "custom"
) -> Splits:
    """Splits of images x (N, C, H, W) already scaled to [0, 1], labels y (N,) in 0..K-1."""
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    train, val, test = split_stratified(x, y, val_fraction, test_fraction, seed)
    labels = tuple(str(k) for k in range(int(y.max()) + 1))
    return Splits(train, val, test, labels, dataset)


def load_digits_splits(val_fraction: float, test_fraction: float, seed: int) -> Splits:
    digits = load_digits()
    x = (digits.images * DIGITS_SCALE).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    train, val, test = split_stratified(x, y, val_fraction, test_fraction, seed)
    labels = tuple(str(k) for k in range(10))
    return Splits(train, val, test, labels, "digits", DIGITS_SCALE)


def load_splits(dataset: str, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    if dataset != "digits":
        raise ValueError(f"unknown dataset {dataset!r}; the bundled one is 'digits' (pass other data to train())")
    return load_digits_splits(val_fraction, test_fraction, seed)


def shard_indices(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of a seeded shuffle of range(n): the same permutation on every rank, padded by
    wrapping around so every rank gets as many samples (as DistributedSampler does)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world)
    perm = torch.cat([perm, perm[: per_rank * world - n]])
    return perm[rank::world]


def batch_bounds(n: int, batch_size: int, drop_single: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch over n samples.

    Policy for BatchNorm (drop_single=True): a trailing batch of one sample is dropped, because BatchNorm
    cannot estimate batch statistics from one sample; that sample is still seen in other epochs, since the
    order is reshuffled each epoch.
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if drop_single and bounds and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def batches(
    split: Split, indices: torch.Tensor, bounds: list[tuple[int, int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start, stop in bounds:
        idx = indices[start:stop]
        yield split.x[idx], split.y[idx]  # (B, C, H, W), (B,)
