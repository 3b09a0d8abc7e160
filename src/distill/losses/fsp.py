"""Flow of solution procedure (Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast
Optimization, Network Minimization and Transfer Learning").

The knowledge is how features change between two layers: the FSP matrix of a pair of maps
``F1 [B, C1, H, W]`` and ``F2 [B, C2, H, W]`` is their Gram matrix across layers,
``G[b, i, j] = Σ_{h,w} F1[b, i, h, w] · F2[b, j, h, w] / (H · W)`` (the paper's Eq. 1), and the
student matches the teacher's FSP matrices in squared L2 norm (Eq. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss, shapes_example


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[B, C1, H, W]`` and ``[B, C2, H', W']`` → ``[B, C1, C2]``, ``Σ_hw F1·F2 / (H·W)``.

    When the two maps differ in spatial size, both are average-pooled to the smaller height and
    width first (the paper pairs layers of equal size; pooling is our extension).
    """
    if first.shape[-2:] != second.shape[-2:]:
        size = (min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1]))
        first = F.adaptive_avg_pool2d(first, size) if first.shape[-2:] != size else first
        second = F.adaptive_avg_pool2d(second, size) if second.shape[-2:] != size else second
    h, w = first.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


def _pair_shapes(shape, side: str) -> list[tuple[int, ...]]:
    if not isinstance(shape, list):
        raise ValueError(
            f"fsp reads pairs of layers: give {side}=[a1, b1, a2, b2, ...] (an even number of taps), "
            f"got a single shape {shape}"
        )
    if not shape or len(shape) % 2:
        raise ValueError(
            f"fsp reads pairs of layers: the {side} taps must be an even, non-zero number, got {len(shape)}"
        )
    for i, s in enumerate(shape):
        if len(s) != 4:
            raise ValueError(f"fsp needs [B, C, H, W] maps; {side} tap {i} has shape {tuple(s)}")
    return [tuple(s) for s in shape]


@register_loss(
    "fsp", inputs=("student", "teacher"), module=True,
    example=shapes_example([(8, 3, 4, 4), (8, 2, 4, 4)], [(8, 4, 4, 4), (8, 5, 4, 4)]),
)
class FSPLoss(nn.Module):
    """Squared Frobenius distance between student and teacher FSP matrices.

    Inputs are lists ``[a1, b1, a2, b2, ...]`` of ``[B, C, H, W]`` maps on each side, read in pairs
    ``(a_i, b_i)``; both sides have the same number of pairs. Each student map first goes through a
    1×1 convolution to the teacher's channel count (identity where the counts already agree), so
    the FSP matrices have the same ``[C1, C2]`` shape.

    Loss: ``mean over pairs of mean over samples of ‖G_s − G_t‖²_F`` — the paper's
    ``(1/N) Σ_x Σ_i λ_i ‖G_i^T − G_i^S‖²₂`` with equal weights ``λ_i = 1/n`` for the ``n`` pairs.
    Zero when the (adapted) student maps equal the teacher's. Computation in float32.
    """

    def __init__(
        self,
        student_shape: list[tuple[int, ...]],
        teacher_shape: list[tuple[int, ...]],
    ) -> None:
        super().__init__()
        s = _pair_shapes(student_shape, "student")
        t = _pair_shapes(teacher_shape, "teacher")
        if len(s) != len(t):
            raise ValueError(
                f"fsp: the student taps {len(s)} layers ({len(s) // 2} pairs) but the teacher taps "
                f"{len(t)} ({len(t) // 2} pairs); give both sides the same number of pairs"
            )
        self.student_channels = [x[1] for x in s]
        self.teacher_channels = [x[1] for x in t]
        self.adapters = nn.ModuleList(
            nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=1, bias=False)
            for cs, ct in zip(self.student_channels, self.teacher_channels)
        )

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        n = len(self.adapters)
        for side, maps, channels in (("student", student, self.student_channels),
                                     ("teacher", teacher, self.teacher_channels)):
            if not isinstance(maps, (list, tuple)) or len(maps) != n:
                raise ValueError(f"fsp: expected a list of {n} {side} maps, as in the first batch")
            for i, (x, c) in enumerate(zip(maps, channels)):
                if x.dim() != 4 or x.shape[1] != c:
                    raise ValueError(
                        f"fsp: {side} tap {i} has shape {tuple(x.shape)}; expected [B, {c}, H, W]"
                    )
        if len({x.shape[0] for x in [*student, *teacher]}) != 1:
            raise ValueError("fsp: all student and teacher maps must have the same batch size")
        with torch.autocast(student[0].device.type, enabled=False):
            s = [adapter(x.float()) for adapter, x in zip(self.adapters, student)]
            t = [x.float() for x in teacher]
            losses = []
            for i in range(0, n, 2):
                diff = fsp_matrix(s[i], s[i + 1]) - fsp_matrix(t[i], t[i + 1])
                losses.append(diff.pow(2).sum(dim=(1, 2)).mean())
            return torch.stack(losses).mean()
