"""Pairwise ranking distillation in the manner of RankNet (Burges et al. 2005): the student's
probability that item i ranks above item j, ``sigmoid(s_i - s_j)``, is trained towards the
teacher's, ``sigmoid((t_i - t_j) / T)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss(
    "ranknet_kd", inputs=("student", "teacher"),
    exempt={"zero_at_match": "a cross-entropy of pair probabilities: at the teacher it is their entropy, its minimum"},
)
def ranknet_kd_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy between pair probabilities over every pair ``i < j`` of each list.

    Shapes: ``[B, L]`` scores of ``L`` candidates per user (``L >= 2``). Reduction: mean over the
    ``L (L - 1) / 2`` pairs and over users. The pair ``(j, i)`` would add the same term as
    ``(i, j)``, so each unordered pair is counted once. At ``T = 1`` the loss is smallest when the
    student's score differences equal the teacher's (``s = t + c``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
        raise ValueError(
            f"ranknet_kd: needs student and teacher scores of one shape [B, L], got "
            f"{tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    length = student_scores.shape[1]
    if length < 2:
        raise ValueError(f"ranknet_kd: a list needs at least 2 candidates to form a pair, got {length}")
    i, j = torch.triu_indices(length, length, offset=1, device=student_scores.device)
    s, t = student_scores.float(), teacher_scores.float()
    student_diff = s[:, i] - s[:, j]  # [B, P]
    target = torch.sigmoid((t[:, i] - t[:, j]) / temperature)
    return F.binary_cross_entropy_with_logits(student_diff, target)
