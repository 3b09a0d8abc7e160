"""ShuffleNetV2 (Ma et al. 2018) for 32×32 images, in the CRD benchmark's form.

As in the RepDistiller code the stem is a 1×1 conv with no max pooling, so a 32×32 input reaches
the classifier at 4×4. Each stage is one down-sampling unit followed by ``n`` basic units that
split the channels in half, transform one half and shuffle the two back together. Parameter
names match that code (``linear`` is the classifier), so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.cnn import global_pool, image_channels
from distill.models.registry import MODELS

# net_size -> (stage output channels, final 1×1 conv channels, basic units per stage)
CONFIGS: dict[float, tuple[tuple[int, int, int], int, tuple[int, int, int]]] = {
    0.2: ((40, 80, 160), 512, (3, 3, 3)),
    0.3: ((40, 80, 160), 512, (3, 7, 3)),
    0.5: ((48, 96, 192), 1024, (3, 7, 3)),
    1: ((116, 232, 464), 1024, (3, 7, 3)),
    1.5: ((176, 352, 704), 1024, (3, 7, 3)),
    2: ((224, 488, 976), 2048, (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave channel groups: ``[B, g·c, H, W]`` → ``[B, c·g, H, W]`` (same shape)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class BasicUnit(nn.Module):
    """Keep half the channels, send the other half through 1×1 → 3×3 dw → 1×1; then shuffle.

    ``[B, C, H, W]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.half = half
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, branch = x[:, : self.half], x[:, self.half :]
        branch = self.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = self.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([keep, branch], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches on the whole input, concatenated and shuffled.

    ``[B, C_in, H, W]`` → ``[B, C_out, H/2, W/2]``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        # left: depthwise 3×3 stride 2 → 1×1
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1×1 → depthwise 3×3 stride 2 → 1×1
        self.conv3 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """``[B, C, H, W]`` → ``[B, num_classes]``; stages ``layer1..3`` at 1/2, 1/4 and 1/8 size."""

    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1) -> None:
        super().__init__()
        stage_channels, last, units = CONFIGS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        channels = 24
        for i, (out, n) in enumerate(zip(stage_channels, units), start=1):
            stage = nn.Sequential(DownUnit(channels, out), *(BasicUnit(out) for _ in range(n)))
            self.add_module(f"layer{i}", stage)
            channels = out
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.pool = global_pool()
        self.linear = nn.Linear(last, num_classes)
        self.feature_taps = ["layer1", "layer2", "layer3", "pool"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(self.pool(x))


@MODELS.register("shufflenetv2")
def shufflenetv2(num_classes: int, input_shape: tuple[int, ...], net_size: float = 1) -> nn.Module:
    """CIFAR ShuffleNetV2; ``net_size`` is one of 0.2, 0.3, 0.5, 1, 1.5, 2 (CRD's is 1)."""
    channels = image_channels(input_shape, "shufflenetv2")
    valid = isinstance(net_size, (int, float)) and not isinstance(net_size, bool)
    if not valid or net_size not in CONFIGS:
        sizes = ", ".join(str(s) for s in CONFIGS)
        raise DistillError(
            f"model 'shufflenetv2': net_size must be one of {sizes}, got {net_size!r}"
        )
    return ShuffleNetV2(num_classes, channels, net_size)
