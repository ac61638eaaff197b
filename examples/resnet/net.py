"""The user's model: a small ResNet for 3x64x64 images, residual blocks with BatchNorm, heavier than the images
example's CNN (about 12 M multiply-adds per image against 3 M): a model where the forward pass dominates what a
server spends. gradserve calls `build` with the config's args, plus `in_shape` ((C, H, W)) and `num_classes`."""

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut; `stride` 2 halves the frame (the shortcut then
    projects with a strided 1x1 convolution)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        # A strided stem, as ResNets have: the first stage works at half the frame.
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, c = [], width
        for i, count in enumerate(blocks):  # each stage after the first halves the frame and doubles the width
            c_out = width * 2 ** i
            stages += [Block(c, c_out, stride=1 if i == 0 else 2)] + [Block(c_out, c_out) for _ in range(count - 1)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        # Global max pooling: the digit is somewhere in a frame that is mostly background, whose average would
        # drown it (with average pooling this model barely learns in the epochs the config gives it).
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width, 32, 32)
        x = self.stages(x)  # (B, width * 2 ** (stages - 1), 8, 8)
        return self.head(x)  # (B, num_classes)


def build(in_shape: tuple[int, int, int], num_classes: int, width: int = 16,
          blocks: tuple[int, ...] = (1, 1, 1)) -> nn.Module:
    return ResNet(in_shape[0], num_classes, width, tuple(blocks))
