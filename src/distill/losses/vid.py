"""Variational Information Distillation (Ahn, Hu, Damianou, Lawrence & Dai 2019, "Variational
Information Distillation for Knowledge Transfer").

VID maximises a variational lower bound on the mutual information between a teacher feature ``t``
and a student feature ``s``: the student feature must predict the teacher feature under a Gaussian
``q(t | s) = N(t; μ(s), σ²)`` whose mean ``μ`` is a small regressor of ``s`` and whose variance
``σ²`` is learned per channel, independent of the input. The loss is the negative log-likelihood
of the teacher feature under ``q``, without the constant ``½·log 2π``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss, shapes_example


def _single_shape(shape, side: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise ValueError(
            f"vid reads one {side} tap, got shapes {shape}; give a single tap name for the {side}"
        )
    if len(shape) not in (2, 4):
        raise ValueError(
            f"vid needs [B, D] vectors or [B, C, H, W] maps; the {side} feature has shape {shape}"
        )
    return shape


@register_loss(
    "vid", inputs=("student", "teacher"), module=True,
    example=shapes_example((8, 3, 8, 8), (8, 5, 4, 4)),
    exempt={"zero_at_match": "a Gaussian negative log-likelihood through a learned regressor of the student: "
                             "equal features leave the regressor's error and the term 0.5 log(sigma^2)"},
)
class VIDLoss(nn.Module):
    """Gaussian negative log-likelihood of the teacher feature given the student feature.

    ``μ = regressor(s)``: for ``[B, C, H, W]`` maps, 1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv
    (``Cs → mid → mid → Ct``, as in the paper's code); for ``[B, D]`` vectors, the same with linear
    layers. ``σ²_c = softplus(α_c) + eps`` per teacher channel, with ``α`` initialised so that
    ``σ²`` starts at ``init_pred_var`` (5.0 in the paper's code).

    Loss: ``mean over B, C, H, W of ½·(log σ²_c + (t − μ)² / σ²_c)``. It is *not* non-negative:
    its minimum for a given error is ``½·(log mse + 1)``, negative once the prediction is good.

    When the maps differ in spatial size, both are average-pooled to the smaller height and width
    (the larger one is reduced; the smaller is left as is). ``mid_channels`` defaults to the
    teacher's channel count (the paper's code uses the teacher width for the hidden layers).
    Inputs may be any float dtype; the computation is float32.
    """

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        *,
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        s = _single_shape(student_shape, "student")
        t = _single_shape(teacher_shape, "teacher")
        if len(s) != len(t):
            raise ValueError(
                f"vid: student feature {s} and teacher feature {t} differ in rank; tap features "
                "of the same kind (both [B, C, H, W] maps or both [B, D] vectors)"
            )
        if not eps > 0:
            raise ValueError(f"vid: eps must be positive, got {eps}")
        if not (math.isfinite(init_pred_var) and init_pred_var > eps):
            raise ValueError(f"vid: init_pred_var must be finite and larger than eps, got {init_pred_var}")
        mid = t[1] if mid_channels is None else mid_channels
        if not (isinstance(mid, int) and mid > 0):
            raise ValueError(f"vid: mid_channels must be a positive integer, got {mid_channels}")
        self.spatial = len(s) == 4
        self.student_channels, self.teacher_channels = s[1], t[1]
        self.eps = float(eps)
        if self.spatial:
            def layer(i: int, o: int) -> nn.Module:
                return nn.Conv2d(i, o, kernel_size=1, bias=False)
        else:
            def layer(i: int, o: int) -> nn.Module:
                return nn.Linear(i, o, bias=False)
        self.regressor = nn.Sequential(
            layer(s[1], mid), nn.ReLU(), layer(mid, mid), nn.ReLU(), layer(mid, t[1])
        )
        # softplus(α) + eps = init_pred_var  <=>  α = log(exp(init_pred_var − eps) − 1)
        alpha = math.log(math.expm1(init_pred_var - eps))
        self.alpha = nn.Parameter(torch.full((t[1],), alpha))

    def variance(self) -> torch.Tensor:
        """The per-channel variance ``σ² = softplus(α) + eps``, shape ``[Ct]``."""
        return F.softplus(self.alpha) + self.eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        rank = 4 if self.spatial else 2
        for side, x, channels in (("student", student, self.student_channels),
                                  ("teacher", teacher, self.teacher_channels)):
            if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[1] != channels:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"vid: expected a {side} feature with {channels} channels and {rank} dimensions "
                    f"(as in the first batch), got {got}"
                )
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"vid: student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}"
            )
        with torch.autocast(student.device.type, enabled=False):
            s, t = student.float(), teacher.float()
            if self.spatial and s.shape[-2:] != t.shape[-2:]:
                size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
                s = F.adaptive_avg_pool2d(s, size) if s.shape[-2:] != size else s
                t = F.adaptive_avg_pool2d(t, size) if t.shape[-2:] != size else t
            mean = self.regressor(s)
            var = self.variance().view(1, -1, *([1, 1] if self.spatial else []))
            nll = 0.5 * (torch.log(var) + (t - mean) ** 2 / var)
            return nll.mean()
