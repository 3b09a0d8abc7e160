"""Knowledge review (Chen, Liu, Zhao & Jia 2021, "Distilling Knowledge via Knowledge Review").

Each teacher stage is matched not by the student's same stage alone but by a fusion of that stage
with all deeper student stages: going from the deepest stage to the shallowest, an attention-based
fusion (ABF) block mixes the current student stage with the residual carried up from the deeper
ones, emits a feature in the teacher stage's shape, and passes its fused map on. Each emitted
feature is compared with its teacher stage by the hierarchical context loss (HCL): the squared
error at full resolution and after average pooling to 4×4, 2×2 and 1×1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss, shapes_example

HCL_LEVELS = (4, 2, 1)


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss between two ``[B, C, H, W]`` maps of the same shape.

    ``Σ_k w_k · mse(pool_k(s), pool_k(t)) / Σ_k w_k`` over the full map (``w = 1``) and average
    pools to 4×4, 2×2, 1×1 (``w = ½, ¼, ⅛``); pool levels not smaller than the map are skipped, and
    the weights of the levels kept are renormalised (as in the paper's code). ``mse`` is the mean
    over all elements. Zero exactly when the maps are equal.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hcl: shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= min(student.shape[-2:]):
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student, level)
        pooled_t = F.adaptive_avg_pool2d(teacher, level)
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


class AttentionFusion(nn.Module):
    """ABF: fuse one student stage with the residual from deeper stages.

    ``x [B, Cin, H, W]`` → 1×1 conv + BN to ``mid`` channels; if a residual ``[B, mid, h, w]`` is
    given it is resized (nearest) to ``H×W`` and mixed with ``x`` by two per-pixel attention maps
    (``sigmoid(1×1 conv([x, r]))``). The fused map is resized (nearest) to the teacher stage's size
    and becomes the residual for the next, shallower stage; a 3×3 conv + BN takes it to ``Cout``
    channels, the output compared with the teacher.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.expand = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.attention = nn.Conv2d(2 * mid_channels, 2, kernel_size=1) if fuse else None
        # the paper's code initialises both convolutions with kaiming_uniform_(a=1)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("reviewkd: a fusing stage needs the residual of the deeper stages")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            weights = torch.sigmoid(self.attention(torch.cat([x, residual], dim=1)))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.expand(x), x


def _stage_shapes(shape, side: str) -> list[tuple[int, ...]]:
    if not isinstance(shape, list):
        raise ValueError(
            f"reviewkd reads several stages: give {side}=[stage1, stage2, ...] ordered shallow to "
            f"deep, got a single shape {shape}"
        )
    for i, s in enumerate(shape):
        if len(s) != 4:
            raise ValueError(
                f"reviewkd needs [B, C, H, W] feature maps; {side} stage {i} has shape {tuple(s)}"
            )
    return [tuple(s) for s in shape]


@register_loss(
    "reviewkd", inputs=("student", "teacher"), module=True,
    example=shapes_example([(8, 3, 8, 8), (8, 4, 4, 4)], [(8, 5, 8, 8), (8, 6, 4, 4)]),
    exempt={"zero_at_match": "the fusion blocks transform the student's features before they are compared"},
)
class ReviewKDLoss(nn.Module):
    """Knowledge review with ABF fusion and the hierarchical context loss.

    Inputs: lists of ``[B, C_i, H_i, W_i]`` stage features, ordered shallow → deep, the same number
    on each side. Stage ``i`` of the student (``Cs_i`` channels) gets an ABF block to ``Ct_i``
    channels at the teacher stage's ``H×W``; the deepest block has no fusion. The residual runs
    deep → shallow (the paper's residual learning framework, its Fig. 2(d) and Algorithm).

    Loss: ``Σ_i hcl(ABF_i, t_i)`` — summed over stages as in the paper's code (each ``hcl`` is a
    weighted mean over elements and pool levels). Non-negative. It is not zero when the student's
    features equal the teacher's: the ABF blocks transform them.

    ``mid_channels`` is the fused width; the paper's CIFAR models use 256 (ImageNet:
    ``min(512, deepest student width)``). The default here, 64, keeps the blocks small next to the
    students this toolkit targets. Computation in float32.
    """

    def __init__(
        self,
        student_shape: list[tuple[int, ...]],
        teacher_shape: list[tuple[int, ...]],
        *,
        mid_channels: int = 64,
    ) -> None:
        super().__init__()
        s = _stage_shapes(student_shape, "student")
        t = _stage_shapes(teacher_shape, "teacher")
        if not s or len(s) != len(t):
            raise ValueError(
                f"reviewkd: the student taps {len(s)} stages and the teacher {len(t)}; "
                "give both the same number of stages (at least one)"
            )
        if not (isinstance(mid_channels, int) and mid_channels > 0):
            raise ValueError(f"reviewkd: mid_channels must be a positive integer, got {mid_channels}")
        self.student_channels = [x[1] for x in s]
        self.teacher_channels = [x[1] for x in t]
        deepest = len(s) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(cs, mid_channels, ct, fuse=i != deepest)
            for i, (cs, ct) in enumerate(zip(self.student_channels, self.teacher_channels))
        )

    def fused(self, student: list[torch.Tensor], teacher_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The ABF outputs, one per stage (shallow → deep), each in its teacher stage's shape."""
        outputs: list[torch.Tensor] = [None] * len(student)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(student))):
            outputs[i], residual = self.fusions[i](student[i], residual, teacher_sizes[i])
        return outputs

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        n = len(self.fusions)
        for side, maps, channels in (("student", student, self.student_channels),
                                     ("teacher", teacher, self.teacher_channels)):
            if not isinstance(maps, (list, tuple)) or len(maps) != n:
                raise ValueError(f"reviewkd: expected a list of {n} {side} stages, as in the first batch")
            for i, (x, c) in enumerate(zip(maps, channels)):
                if x.dim() != 4 or x.shape[1] != c:
                    raise ValueError(
                        f"reviewkd: {side} stage {i} has shape {tuple(x.shape)}; expected [B, {c}, H, W]"
                    )
        if len({x.shape[0] for x in [*student, *teacher]}) != 1:
            raise ValueError("reviewkd: all student and teacher stages must have the same batch size")
        with torch.autocast(student[0].device.type, enabled=False):
            t = [x.float() for x in teacher]
            outputs = self.fused([x.float() for x in student], [tuple(x.shape[-2:]) for x in t])
            return torch.stack([hcl_loss(o, x) for o, x in zip(outputs, t)]).sum()
