"""Data as the loop sees it: train/val/test splits of (x, y) tensors, seeded and (for classification)
stratified, already preprocessed the way the archive will preprocess a request (handlers/preprocess.py), and
shuffled batches of them. Where the examples come from is training/datasets.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from handlers.preprocess import Preprocess, statistics


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, *in_shape) float32, standardised when the preprocessing says so
    y: torch.Tensor  # (N,) int64 class index, or (N, T) float32 standardised regression targets

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    labels: tuple[str, ...]  # class names (classification) or target names (regression)
    dataset: str = "custom"
    scale: float = 1.0  # what raw pixels were multiplied by to land in [0, 1] (the digits: 1/16)
    task: str = "classification"
    preprocess: Preprocess | None = None  # None: images taken as they are (made by make_splits)
    sources: dict[str, Any] = field(default_factory=dict)  # where the examples came from, for people

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train.x.shape[1:])

    @property
    def outputs(self) -> int:
        """What the model's last layer produces: classes, or regression targets."""
        return len(self.labels)

    def describe(self) -> dict[str, object]:
        """The `data` entry of every checkpoint: enough to feed the model the way it was trained."""
        return {"dataset": self.dataset, "shape": list(self.shape), "labels": list(self.labels), "scale": self.scale,
                "task": self.task, "preprocess": self.preprocess.to_dict() if self.preprocess else None,
                **self.sources}


def split_indices(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  stratify: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test indices; stratified (every class's share the same in each part) when asked and
    possible (every class has examples enough), plain shuffled otherwise."""
    index = np.arange(len(y))
    counts = np.unique(y, return_counts=True)[1]
    strata = y if stratify and counts.min() >= 3 else None
    rest, test = train_test_split(index, test_size=test_fraction, stratify=strata, random_state=seed)
    val_share = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=None if strata is None else y[rest],
                                  random_state=seed)
    return train, val, test


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
    """Splits of images x (N, C, H, W) already scaled to [0, 1], labels y (N,) in 0..K-1, taken as they are."""
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    train, val, test = split_stratified(x, y, val_fraction, test_fraction, seed)
    labels = tuple(str(k) for k in range(int(y.max()) + 1))
    return Splits(train, val, test, labels, dataset)


def preprocessed_splits(parts: dict[str, tuple[np.ndarray, np.ndarray]], labels: tuple[str, ...], task: str,
                        preprocess: Preprocess, standardize: bool, dataset: str,
                        sources: dict[str, Any] | None = None) -> Splits:
    """Splits from raw (x, y) parts "train", "val", "test": the standardisation statistics are measured on the
    train part alone, then applied to every part by the archive's own code (Preprocess.standardize)."""
    x_train, y_train = parts["train"]
    if standardize:
        mean, std = statistics(x_train, preprocess.kind)
        preprocess = replace(preprocess, mean=mean, std=std)
    if task == "regression":
        target_mean, target_std = statistics(y_train, "table")
        preprocess = replace(preprocess, target_mean=target_mean, target_std=target_std)

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        # Through a flat view: the default strides. An indexed (N, 1, H, W) array can carry strides that look like
        # channels-last, which sends the convolutions down another kernel (same maths, other rounding).
        flat = torch.as_tensor(np.reshape(x, (len(x), -1)), dtype=torch.float32)
        xs = preprocess.standardize(flat.view(len(x), *x.shape[1:]))
        if task == "regression":
            return Split(xs, preprocess.standardize_target(torch.as_tensor(y, dtype=torch.float32)))
        return Split(xs, torch.as_tensor(y, dtype=torch.int64))

    train, val, test = (split(*parts[name]) for name in ("train", "val", "test"))
    return Splits(train, val, test, labels, dataset, task=task, preprocess=preprocess, sources=sources or {})


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
        yield split.x[idx], split.y[idx]  # (B, *in_shape), (B,) or (B, T)
