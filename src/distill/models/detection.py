"""Small anchor-free detectors, CenterNet style (Zhou, Wang & Krähenbühl 2019, "Objects as Points").

    model = create_detector("centernet-student", num_classes=10, in_channels=1)
    out = model(images)   # [B, 1, H, W] -> {"heatmap": [B, 10, H/4, W/4], "size": [B, 2, ..], "offset": [B, 2, ..]}

A conv backbone (stride 2 stem, then stages at strides 4, 8 and 16) feeds an FPN-lite neck (Lin et
al. 2017: 1×1 lateral convolutions, nearest upsampling and sums, top-down to stride 4, then a 3×3
convolution), and three heads read the neck: class heat-maps (logits, one sigmoid per class; the
bias starts at -2.19 so every score starts near 0.1, as in CenterNet), box size ``(w, h)`` and
centre offset, both in output cells. Taps: ``neck`` (the feature the heads read), ``heatmap``,
``size`` and ``offset`` (each head's output), and the stages in ``feature_taps``.

These models do not fit the classification zoo's contract (logits ``[B, num_classes]``), so they
have their own registry here. Decoding and targets live in :mod:`distill.tasks.detection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.registry import Registry

DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detection model")
PRIOR = 0.1  # initial heat-map score


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stage(cin: int, cout: int, depth: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout, stride), *[_conv(cout, cout) for _ in range(depth - 1)])


class FPNLite(nn.Module):
    """Top-down fusion of stride-4, -8 and -16 features into one stride-4 map of ``width`` channels."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = _conv(width, width)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return self.smooth(x)


class Head(nn.Sequential):
    """3×3 convolution, ReLU, 1×1 convolution to ``out`` channels."""

    def __init__(self, cin: int, width: int, out: int, bias: float = 0.0) -> None:
        super().__init__(nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1))
        nn.init.constant_(self[-1].bias, bias)


class CenterNet(nn.Module):
    """A CenterNet detector at output stride 4 (see the module docstring).

    ``widths``: channels of the stem and of the stride-4, -8 and -16 stages; ``depth``: 3×3
    convolutions per stage; ``neck``: channels of the fused stride-4 feature; ``head``: channels of
    each head's hidden layer. ``forward`` returns ``{"heatmap", "size", "offset"}``.
    """

    stride = 4

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 64),
        depth: int = 1,
        neck: int = 32,
        head: int = 32,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or depth < 1:
            raise DistillError(f"widths must list 4 channel counts and depth be >= 1, got {widths}, {depth}")
        self.num_classes = num_classes
        self.stem = _conv(in_channels, widths[0], 2)
        self.stage1 = _stage(widths[0], widths[1], depth, 2)
        self.stage2 = _stage(widths[1], widths[2], depth, 2)
        self.stage3 = _stage(widths[2], widths[3], depth, 2)
        self.neck = FPNLite(widths[1:], neck)
        self.heatmap = Head(neck, head, num_classes, bias=-math.log((1 - PRIOR) / PRIOR))
        self.size = Head(neck, head, 2)
        self.offset = Head(neck, head, 2)
        self.feature_taps = ["stage1", "stage2", "stage3", "neck"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.stage1(self.stem(x))
        c8 = self.stage2(c4)
        c16 = self.stage3(c8)
        feature = self.neck([c4, c8, c16])
        return {"heatmap": self.heatmap(feature), "size": self.size(feature), "offset": self.offset(feature)}


@DETECTORS.register("centernet")
def centernet(num_classes: int = 10, in_channels: int = 1, **options) -> CenterNet:
    """A CenterNet of any size: ``widths``, ``depth``, ``neck``, ``head`` (see :class:`CenterNet`)."""
    return CenterNet(num_classes, in_channels, **options)


@DETECTORS.register("centernet-teacher")
def centernet_teacher(num_classes: int = 10, in_channels: int = 1) -> CenterNet:
    """Widths 24-48-96-128, two convolutions per stage, neck and heads 48 wide (512 k parameters)."""
    return CenterNet(num_classes, in_channels, widths=(24, 48, 96, 128), depth=2, neck=48, head=48)


@DETECTORS.register("centernet-student")
def centernet_student(num_classes: int = 10, in_channels: int = 1) -> CenterNet:
    """Widths 8-16-48-96, one convolution per stage, neck and heads 24 wide (75 k parameters, 6.8× fewer
    than ``centernet-teacher``)."""
    return CenterNet(num_classes, in_channels, widths=(8, 16, 48, 96), depth=1, neck=24, head=24)


def create_detector(name: str, num_classes: int = 10, in_channels: int = 1, **options) -> nn.Module:
    """Build the detector registered as ``name``."""
    factory = DETECTORS.get(name)
    try:
        return factory(num_classes, in_channels, **options)
    except TypeError as exc:
        raise DistillError(f"detection model '{name}': {exc}") from None


def detector_names() -> list[str]:
    return DETECTORS.names()
