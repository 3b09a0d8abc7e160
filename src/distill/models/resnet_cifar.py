"""CIFAR ResNets (He et al. 2016) as used in the CRD benchmark (Tian, Krishnan & Isola 2020).

Depth ``6n + 2``: a 3×3 stem, three stages of ``n`` basic blocks (stride 1, 2, 2), global average
pooling and a linear classifier. ``resnetNxM`` multiplies the widths by 4 (32/64/128/256 instead
of 16/16/32/64). Parameter names match the RepDistiller code, so its released CIFAR-100 teacher
checkpoints load with :func:`distill.models.load_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.cnn import global_pool, image_channels, init_conv_bn
from distill.models.registry import MODELS


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut (1×1 conv-BN when the shape changes), then ReLU.

    ``[B, C_in, H, W]`` → ``[B, C_out, H / stride, W / stride]``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """``[B, C, H, W]`` → ``[B, num_classes]``; stages ``layer1..3`` at full, 1/2 and 1/4 size."""

    def __init__(
        self, depth: int, widths: Sequence[int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise DistillError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.pool = global_pool()
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_taps = ["layer1", "layer2", "layer3", "pool"]
        init_conv_bn(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _register(name: str, depth: int, widths: Sequence[int]) -> None:
    def factory(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, image_channels(input_shape, name))

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, stage widths {tuple(widths)} (CRD's '{name}')."
    MODELS.register(name, factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _NARROW)
_register("resnet8x4", 8, _WIDE)
_register("resnet32x4", 32, _WIDE)
