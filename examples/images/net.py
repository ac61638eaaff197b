"""The user's model: a small CNN with BatchNorm for 3x32x32 images. gradserve calls `build` with the config's
args, plus `in_shape` ((C, H, W)) and `num_classes`."""

from torch import nn


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2))


def build(in_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> nn.Module:
    channels = in_shape[0]
    return nn.Sequential(
        block(channels, width), block(width, 2 * width), block(2 * width, 4 * width),  # 32 -> 16 -> 8 -> 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )
