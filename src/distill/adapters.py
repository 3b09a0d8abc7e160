"""Small trainable modules that map a student feature to the shape of a teacher feature.

They are created from the shapes seen in a dry run, trained with the student, and never exported
with it (FitNets' regressor, Romero et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError

ADAPTER_KINDS = ("auto", "identity", "linear", "conv1x1", "conv1d")


class SpatialConvAdapter(nn.Module):
    """1×1 convolution from ``Cs`` to ``Ct`` channels, then resizing to the teacher's ``H×W``.

    ``[B, Cs, Hs, Ws]`` → ``[B, Ct, Ht, Wt]``. Larger student maps are average-pooled, smaller
    ones bilinearly upsampled.
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if tuple(x.shape[-2:]) != self.size:
            if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


class ChannelConv1dAdapter(nn.Module):
    """1×1 convolution over channels of ``[B, Cs, L]`` to ``[B, Ct, Lt]`` (length resized)."""

    def __init__(self, in_channels: int, out_channels: int, length: int) -> None:
        super().__init__()
        self.proj = nn.Conv1d(in_channels, out_channels, kernel_size=1)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if x.shape[-1] != self.length:
            x = F.interpolate(x, size=self.length, mode="linear", align_corners=False)
        return x


def make_adapter(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "auto"
) -> nn.Module:
    """An adapter taking a student feature of ``student_shape`` to ``teacher_shape``.

    Shapes include the batch dimension. ``auto`` picks: identity when shapes agree; a linear map
    on the last dimension for ``[B, D]`` and ``[B, T, D]`` features (tokens); a 1×1 convolution
    for ``[B, C, H, W]`` maps; a 1×1 1-D convolution for ``[B, C, L]`` when channels differ.
    """
    if kind not in ADAPTER_KINDS:
        raise DistillError(f"unknown adapter '{kind}'; choose one of {', '.join(ADAPTER_KINDS)}")
    s, t = tuple(student_shape), tuple(teacher_shape)
    if kind == "identity" or (kind == "auto" and s == t):
        if s != t:
            raise DistillError(f"identity adapter cannot map student {s} to teacher {t}")
        return nn.Identity()
    if len(s) != len(t):
        raise DistillError(
            f"cannot adapt a student feature of shape {s} to a teacher feature of shape {t}: "
            "they differ in rank; tap features of the same kind (e.g. both conv maps)"
        )
    if s[0] != t[0]:
        raise DistillError(f"student and teacher features differ in batch size: {s} vs {t}")
    if kind == "conv1x1" or (kind == "auto" and len(s) == 4):
        if len(s) != 4:
            raise DistillError(f"conv1x1 adapter needs [B, C, H, W] features, got {s}")
        return SpatialConvAdapter(s[1], t[1], (t[2], t[3]))
    if kind == "conv1d" or (kind == "auto" and len(s) == 3 and s[2] == t[2] and s[1] != t[1]):
        if len(s) != 3:
            raise DistillError(f"conv1d adapter needs [B, C, L] features, got {s}")
        return ChannelConv1dAdapter(s[1], t[1], t[2])
    # linear on the last dimension: [B, D] or [B, T, D] with matching leading dims
    if s[:-1] != t[:-1]:
        raise DistillError(
            f"cannot adapt student feature {s} to teacher feature {t} with a linear map: "
            "all but the last dimension must agree"
        )
    return nn.Linear(s[-1], t[-1])
