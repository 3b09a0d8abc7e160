"""Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation",
ICCV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss, shapes_example


@register_loss("sp", inputs=("student", "teacher"), example=shapes_example((8, 7), (8, 4, 3)))
def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """``‖G_s − G_t‖²_F / B²`` with ``G = F Fᵀ`` row-wise L2-normalised.

    ``F`` is the batch's features flattened per sample, so ``G`` is the ``B×B`` matrix of
    sample-to-sample similarities: the student learns which samples the teacher finds alike,
    not the features themselves. Student and teacher may have different shapes past the batch
    dimension; no adapter is needed.

    Shapes: ``[B, ...]`` and ``[B, ...]`` (same B, at least 2). Reduction: sum of squared
    differences over the ``B×B`` entries divided by B², as in the paper. The paper's term
    weight is γ = 3000 (also mdistiller's).
    """
    if student_feature.dim() < 1 or teacher_feature.dim() < 1:
        raise ValueError("sp: features need a batch dimension")
    batch = student_feature.shape[0]
    if teacher_feature.shape[0] != batch:
        raise ValueError(
            f"sp: student and teacher batch sizes differ ({batch} vs {teacher_feature.shape[0]})"
        )
    if batch < 2:
        raise ValueError(f"sp: relations need at least 2 samples in the batch, got {batch}")
    f_s = student_feature.float().reshape(batch, -1)
    f_t = teacher_feature.float().reshape(batch, -1)
    g_s = F.normalize(f_s @ f_s.t(), dim=1)
    g_t = F.normalize(f_t @ f_t.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / (batch * batch)
