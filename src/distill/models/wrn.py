"""Wide residual networks (Zagoruyko & Komodakis 2016) in the CRD benchmark's form.

``wrn-D-K`` has depth ``D = 6n + 4`` and widening factor ``K``: a 3×3 stem with 16 channels, three
stages of ``n`` pre-activation blocks with ``16K, 32K, 64K`` channels (stride 1, 2, 2), a final
BN-ReLU, global average pooling and a linear classifier. Parameter names follow the RepDistiller
code (including its ``convShortcut``), so its released teacher checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.cnn import global_pool, image_channels, init_conv_bn
from distill.models.registry import MODELS


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-[dropout]-conv3×3 plus a shortcut.

    ``[B, C_in, H, W]`` → ``[B, C_out, H / stride, W / stride]``. When the shape changes the
    shortcut is a 1×1 conv applied to the pre-activated input, as in the original code.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Module | None = None  # noqa: N815 (checkpoint key name)
        if in_ch != out_ch or stride != 1:
            self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class WideStage(nn.Module):
    """``blocks`` wide blocks; only the first changes channels and stride."""

    def __init__(self, blocks: int, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            WideBlock(in_ch, out_ch, stride, dropout),
            *(WideBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """``[B, C, H, W]`` → ``[B, num_classes]``; stages ``block1..3`` at full, 1/2 and 1/4 size."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise DistillError(
                f"wide ResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth!r}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise DistillError(f"wide ResNet width must be a positive integer, got {width!r}")
        number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        if not number or not 0 <= dropout < 1:
            raise DistillError(f"wide ResNet dropout must be a number in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, channels[0], channels[1], 1, dropout)
        self.block2 = WideStage(n, channels[1], channels[2], 2, dropout)
        self.block3 = WideStage(n, channels[2], channels[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.pool = global_pool()
        self.fc = nn.Linear(channels[3], num_classes)
        self.feature_taps = ["block1", "block2", "block3", "pool"]
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn1(x))))


@MODELS.register("wrn")
def wrn(
    num_classes: int,
    input_shape: tuple[int, ...],
    depth: int = 40,
    width: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """WRN-``depth``-``width`` for images; ``dropout`` sits between each block's two convs."""
    return WideResNet(depth, width, num_classes, image_channels(input_shape, "wrn"), dropout)


def _register(depth: int, width: int) -> None:
    name = f"wrn-{depth}-{width}"

    def factory(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
        channels = image_channels(input_shape, name)
        return WideResNet(depth, width, num_classes, channels, dropout)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"WRN-{depth}-{width} (Zagoruyko & Komodakis 2016)."
    MODELS.register(name, factory)
    MODELS.register(name.replace("-", "_"), factory)  # CRD's spelling, e.g. wrn_40_2


for _depth, _width in ((16, 1), (16, 2), (16, 4), (28, 4), (40, 1), (40, 2)):
    _register(_depth, _width)
