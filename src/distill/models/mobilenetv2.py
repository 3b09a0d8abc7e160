"""MobileNetV2 (Sandler et al. 2018) for 32×32 images, in the CRD benchmark's form.

Differences from the ImageNet model follow the RepDistiller code: ReLU instead of ReLU6, the
expansion 1×1 conv is kept even where the expansion ratio is 1, and the last feature layer
has 1280 channels unless the width multiplier exceeds 1. CRD's ``mobile_half`` (its usual
student) is width 0.5. Parameter names match that code, so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.cnn import global_pool, image_channels, init_conv_bn
from distill.models.registry import MODELS

# (expansion ratio or None for "use the model's", output channels, repeats, first stride)
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 linear projection; residual when shapes agree.

    ``[B, C_in, H, W]`` → ``[B, C_out, H / stride, W / stride]``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """``[B, C, H, W]`` → ``[B, num_classes]``; ``blocks`` is a list of the seven stages."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for ratio, out, repeats, stride in STAGES:
            out = int(out * width_mult)
            stage = []
            for i in range(repeats):
                stage.append(
                    InvertedResidual(channels, out, stride if i == 0 else 1, ratio or expand_ratio)
                )
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.pool = global_pool()
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        # The stages CRD taps: end of 1/2, 1/4, 1/8 and 1/16 resolution, then the pooled feature.
        self.feature_taps = ["blocks.1", "blocks.2", "blocks.4", "blocks.6", "pool"]
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.pool(self.conv2(x)))


@MODELS.register("mobilenetv2")
def mobilenetv2(
    num_classes: int,
    input_shape: tuple[int, ...],
    width_mult: float = 1.0,
    expand_ratio: int = 6,
) -> nn.Module:
    """CIFAR MobileNetV2; ``width_mult`` scales the channels (the 1280 head only above 1)."""
    channels = image_channels(input_shape, "mobilenetv2")
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)):
        raise DistillError(f"model 'mobilenetv2': width_mult must be a number, got {width_mult!r}")
    if int(16 * width_mult) < 1:
        raise DistillError(f"model 'mobilenetv2': width_mult {width_mult} leaves layers empty")
    if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, int) or expand_ratio < 1:
        raise DistillError(
            f"model 'mobilenetv2': expand_ratio must be a positive integer, got {expand_ratio!r}"
        )
    return MobileNetV2(num_classes, channels, float(width_mult), expand_ratio)


def mobilenetv2_half(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR MobileNetV2 at width 0.5 (CRD's ``mobile_half``)."""
    return mobilenetv2(num_classes, input_shape, width_mult=0.5)


MODELS.register("mobilenetv2-half", mobilenetv2_half)
MODELS.register("mobile_half", mobilenetv2_half)  # CRD's name
