"""FitNets hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss("hint", inputs=("student", "teacher"), adapts=True)
def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the adapted student feature and the teacher feature.

    Both tensors have the teacher's shape (the objective applies the adapter first), e.g.
    ``[B, C, H, W]`` or ``[B, D]``. Reduction: mean over every element.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint: adapted student feature {tuple(student_feature.shape)} does not match the "
            f"teacher feature {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(student_feature.float(), teacher_feature.float())
