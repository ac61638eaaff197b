"""The user's model: a small MLP for table rows. gradserve calls `build` with the config's args, plus
`in_shape` ((F,), the number of feature columns) and `num_classes`."""

from torch import nn


def build(in_shape: tuple[int, ...], num_classes: int, hidden: int = 16, dropout: float = 0.1) -> nn.Module:
    (features,) = in_shape
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
