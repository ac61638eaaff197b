"""The user's model: an MLP regressor. gradserve calls `build` with the config's args, plus `in_shape` ((F,))
and `num_classes` (here the number of regression targets: 1). It learns the targets standardised with the
training split's mean and spread; the served `prediction` is in the target's own units."""

from torch import nn


def build(in_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    (features,) = in_shape
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
