"""VGG with batch norm for 32×32 images, as in the CRD benchmark (Tian, Krishnan & Isola 2020).

Five blocks of 3×3 conv-BN-ReLU (Simonyan & Zisserman 2015), max pooling after the first three
(and after the fourth only for inputs of 64 pixels or more), global average pooling and one
linear layer: the large fully connected head of ImageNet VGG is gone. ``vgg8`` has one conv per
block. Parameter names match the RepDistiller code, whose ``vggN`` are these BN variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.models.cnn import global_pool, image_channels, init_conv_bn
from distill.models.registry import MODELS

# Output channels of each conv, per block.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _block(in_ch: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_ch in widths:
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``[B, C, H, W]`` → ``[B, num_classes]``; stages ``block0..block4``, then ``pool``."""

    def __init__(
        self,
        config: Sequence[Sequence[int]],
        num_classes: int,
        in_channels: int = 3,
        pool_block3: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [block[-1] for block in config]
        for i, block in enumerate(config):
            self.add_module(f"block{i}", _block(widths[i], block))
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        # At 32×32 the last two blocks both run at 4×4; larger inputs get one more halving.
        self.pool3 = nn.MaxPool2d(2) if pool_block3 else nn.Identity()
        self.pool = global_pool()
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.feature_taps = ["block0", "block1", "block2", "block3", "block4", "pool"]
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.block4(x)
        return self.classifier(self.pool(x))


def _register(name: str) -> None:
    config = CONFIGS[name]

    def factory(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        channels = image_channels(input_shape, name)
        return VGG(config, num_classes, channels, pool_block3=min(input_shape[1:]) >= 64)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR {name.upper()} with batch norm (CRD's '{name}')."
    MODELS.register(name, factory)


for _name in CONFIGS:
    _register(_name)
