"""Small convolutional nets for quick experiments: ``cnn`` (images) and ``cnn1d`` (sequences).

Also home to the shape checks and the global pooling head that every conv net in the zoo shares.
ReLUs are never in place anywhere in the zoo: a tap holds a module's output tensor, and an in-place
activation downstream would overwrite it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.registry import MODELS


def image_channels(input_shape: tuple[int, ...], model: str) -> int:
    """Channels of an image shape ``(C, H, W)``; any other shape is a :class:`DistillError`."""
    if len(input_shape) != 3:
        raise DistillError(
            f"model '{model}' takes images shaped (channels, height, width); got input_shape "
            f"{tuple(input_shape)}"
        )
    return int(input_shape[0])


def global_pool() -> nn.Sequential:
    """Global average pooling and flattening: ``[B, C, H, W]`` → ``[B, C]`` for any ``H×W``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """He init for convolutions (fan-out), unit scale and zero shift for batch norm; with
    ``linear_std``, linear layers get N(0, linear_std²) weights and zero bias (in the same pass)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif linear_std is not None and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _positive_int(value: object, name: str, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistillError(f"model '{model}': {name} must be a positive integer, got {value!r}")
    return value


class SmallCNN(nn.Module):
    """``depth`` blocks of conv3×3-BN-ReLU-maxpool with ``width·2^i`` channels, pool, linear.

    ``[B, C, H, W]`` → ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int, depth: int) -> None:
        super().__init__()
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            block = nn.Sequential(
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.add_module(f"block{i + 1}", block)
            channels = out
        self.depth = depth
        self.pool = global_pool()
        self.fc = nn.Linear(channels, num_classes)
        self.feature_taps = [f"block{i + 1}" for i in range(depth)] + ["pool"]
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = getattr(self, f"block{i + 1}")(x)
        return self.fc(self.pool(x))


@MODELS.register("cnn")
def cnn(
    num_classes: int, input_shape: tuple[int, ...], width: int = 32, depth: int = 3
) -> nn.Module:
    """A small image CNN (28×28 or 32×32): ``depth`` conv blocks, each halving the resolution."""
    channels = image_channels(input_shape, "cnn")
    width = _positive_int(width, "width", "cnn")
    depth = _positive_int(depth, "depth", "cnn")
    if min(input_shape[1:]) < 2**depth:
        raise DistillError(
            f"model 'cnn': depth {depth} halves the resolution {depth} times, too often for "
            f"{input_shape[1]}x{input_shape[2]} images; use depth <= "
            f"{int(math.log2(min(input_shape[1:])))}"
        )
    return SmallCNN(num_classes, channels, width, depth)


def _conv1d_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvNet1d(nn.Module):
    """Three strided 1-D convolutions with ReLU, flatten, linear (MNIST-1D's ConvBase,
    Greydanus 2020).

    ``[B, L]`` or ``[B, C, L]`` → ``[B, num_classes]``; a 2-D batch gets a channel dim.
    """

    def __init__(self, num_classes: int, in_channels: int, length: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(in_channels, width, 5, stride=2, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.flatten = nn.Flatten(1)
        out_length = _conv1d_length(length, 5, 2, 1)
        out_length = _conv1d_length(out_length, 3, 2, 1)
        out_length = _conv1d_length(out_length, 3, 2, 1)
        self.fc = nn.Linear(width * out_length, num_classes)
        self.feature_taps = ["conv1", "conv2", "conv3", "flatten"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.fc(self.flatten(self.conv3(self.conv2(self.conv1(x)))))


@MODELS.register("cnn1d")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> nn.Module:
    """The MNIST-1D convolutional baseline for sequences shaped ``(L,)`` or ``(C, L)``."""
    if len(input_shape) == 1:
        in_channels, length = 1, int(input_shape[0])
    elif len(input_shape) == 2:
        in_channels, length = int(input_shape[0]), int(input_shape[1])
    else:
        raise DistillError(
            f"model 'cnn1d' takes sequences shaped (length,) or (channels, length); got "
            f"input_shape {tuple(input_shape)}"
        )
    width = _positive_int(width, "width", "cnn1d")
    if length < 3:
        raise DistillError(f"model 'cnn1d' needs sequences of length >= 3, got {length}")
    return ConvNet1d(num_classes, in_channels, length, width)
