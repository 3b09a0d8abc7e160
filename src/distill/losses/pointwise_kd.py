"""Pointwise ranking distillation: each (user, item) score is a binary prediction, and the
teacher's tempered probability is its soft label (the soft-target idea of Hinton, Vinyals & Dean
2015 applied item by item)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss(
    "pointwise_kd", inputs=("student", "teacher"),
    exempt={"zero_at_match": "a binary cross-entropy: at the teacher it is the entropy of the teacher's "
                             "probabilities (times T^2), its minimum"},
)
def pointwise_kd_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """BCE(sigmoid(s / T), sigmoid(t / T)) · T², mean over every entry of ``[B, L]`` (any shape).

    The target is the teacher's probability ``sigmoid(t / T)``; the student's prediction is tempered
    the same way, so the loss is smallest (the target's entropy) when ``s = t``. As in ``kd``, T²
    keeps the gradient's size about the same across temperatures.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"pointwise_kd: student scores {tuple(student_scores.shape)} and teacher scores "
            f"{tuple(teacher_scores.shape)} differ in shape (are both scoring the same candidates?)"
        )
    target = torch.sigmoid(teacher_scores.float() / temperature)
    loss = F.binary_cross_entropy_with_logits(student_scores.float() / temperature, target)
    return loss * temperature**2
