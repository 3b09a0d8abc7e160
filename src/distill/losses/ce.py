"""The hard-label loss: cross-entropy with the ground truth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss("ce", inputs=("student", "labels"))
def ce_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``[B, C]`` logits against ``[B]`` class indices; mean over the labelled
    samples of the batch. A label of -100 marks a sample without one (an unlabelled transfer set):
    it is skipped, and a batch without any label gives 0 (with a gradient graph)."""
    if labels.numel() and bool((labels == -100).all()):
        return student_logits.float().sum() * 0.0
    return F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing, ignore_index=-100)
