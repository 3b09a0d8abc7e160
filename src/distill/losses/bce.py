"""Binary cross-entropy with ground-truth labels: the pointwise loss of implicit-feedback
recommendation (He et al. 2017), where each candidate is an observed positive or a sampled
negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


def _example(generator: torch.Generator) -> dict:
    """Scores ``[4, 12]`` and labels of the same shape: positives (1), negatives (0), unlabelled (-1)."""
    return {"student": torch.randn(4, 12, generator=generator) * 2,
            "labels": torch.randint(-1, 2, (4, 12), generator=generator).float()}


@register_loss("bce", inputs=("student", "labels"), example=_example)
def bce_loss(student_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of logits ``[B, L]`` (any shape) against labels of the same shape, mean over labelled entries.

    Labels in ``[0, 1]`` are targets (1 a positive, 0 a negative; soft values are allowed); a
    negative label (``-1``) marks an unlabelled candidate, which is left out (a candidate the teacher
    proposed, for example). With no labelled entry the loss is 0.
    """
    if student_scores.shape != labels.shape:
        raise ValueError(
            f"bce: scores {tuple(student_scores.shape)} and labels {tuple(labels.shape)} differ in shape"
        )
    labels = labels.to(student_scores.dtype if student_scores.is_floating_point() else torch.float32)
    used = labels >= 0
    loss = F.binary_cross_entropy_with_logits(student_scores.float(), labels.clamp(min=0).float(), reduction="none")
    return (loss * used).sum() / used.sum().clamp(min=1)
