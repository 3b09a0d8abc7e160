"""Correlation congruence (Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang 2019, "Correlation
Congruence for Knowledge Distillation", ICCV)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss, shapes_example


def _correlation(x: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``[B, D]`` -> ``[B, B]`` Gaussian-RBF correlations by an order-``order`` Taylor series.

    For unit vectors ``exp(−γ‖a − b‖²) = exp(−2γ) · exp(2γ aᵀb)``; the second factor is expanded
    as ``Σ_{p=0..P} (2γ aᵀb)^p / p!``.
    """
    x = F.normalize(x, dim=1)
    sim = x @ x.t()
    corr = torch.zeros_like(sim)
    for p in range(order + 1):
        corr = corr + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return corr


@register_loss("cc", inputs=("student", "teacher"), example=shapes_example((8, 7), (8, 4, 3)))
def cc_loss(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    gamma: float = 0.4,
    order: int = 2,
) -> torch.Tensor:
    """``‖C_s − C_t‖²_F / B²`` between the batch's sample-to-sample correlation matrices.

    ``C[i, j] = k(f_i, f_j)`` is a Gaussian RBF kernel on the L2-normalised features, approximated
    by its Taylor series of order ``order`` (P in the paper) with bandwidth parameter ``gamma``.
    Only relations between samples are matched, so student and teacher may have any dimensions;
    no adapter.

    Shapes: ``[B, ...]`` and ``[B, ...]``, flattened per sample; at least 2 samples. Reduction:
    mean over the ``B×B`` entries of the squared difference, i.e. the paper's ``1/B²`` times the
    squared Frobenius norm. Defaults gamma 0.4, order 2 are those of the widely used
    Knowledge-Distillation-Zoo re-implementation (the authors' code is not public).
    """
    if order < 0 or int(order) != order:
        raise ValueError(f"cc: order must be a non-negative integer, got {order}")
    if gamma <= 0:
        raise ValueError(f"cc: gamma must be positive, got {gamma}")
    if student_feature.dim() < 1 or teacher_feature.dim() < 1:
        raise ValueError("cc: features need a batch dimension")
    batch = student_feature.shape[0]
    if teacher_feature.shape[0] != batch:
        raise ValueError(
            f"cc: student and teacher batch sizes differ ({batch} vs {teacher_feature.shape[0]})"
        )
    if batch < 2:
        raise ValueError(f"cc: relations need at least 2 samples in the batch, got {batch}")
    c_s = _correlation(student_feature.float().reshape(batch, -1), gamma, int(order))
    c_t = _correlation(teacher_feature.float().reshape(batch, -1), gamma, int(order))
    return (c_s - c_t).pow(2).mean()
