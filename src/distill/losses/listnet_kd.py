"""Listwise ranking distillation with ListNet (Cao et al. 2007, "Learning to Rank: From Pairwise
Approach to Listwise Approach"): the cross-entropy between the teacher's and the student's top-one
probabilities, a softmax over each candidate list."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss(
    "listnet_kd", inputs=("student", "teacher"),
    exempt={"zero_at_match": "a cross-entropy: at the teacher it is the teacher's entropy (times T^2), its minimum"},
)
def listnet_kd_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``-sum_j softmax(t / T)_j · log softmax(s / T)_j`` · T², mean over lists.

    Shapes: ``[B, L]``, one candidate list per user, softmax over ``L``. Reduction: sum over the
    list, mean over users. Smallest (the teacher distribution's entropy, times T²) when
    ``s = t + c``. It differs from ``kd`` on the same tensors only by that constant.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
        raise ValueError(
            f"listnet_kd: needs student and teacher scores of one shape [B, L], got "
            f"{tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    p_t = F.softmax(teacher_scores.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_scores.float() / temperature, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean() * temperature**2
