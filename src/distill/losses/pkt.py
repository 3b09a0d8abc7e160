"""Probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV)."""

from __future__ import annotations

import torch

from distill.losses.registry import register_loss, shapes_example


def _conditional_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row ``i``: ``K(x_i, x_j) / Σ_k K(x_i, x_k)`` with the cosine kernel ``(cos + 1) / 2``."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@register_loss("pkt", inputs=("student", "teacher"), example=shapes_example((8, 7), (8, 4, 3)))
def pkt_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL divergence between the teacher's and the student's sample-affinity distributions.

    Each sample's features define, through the cosine-similarity kernel ``K(a, b) = (cos(a, b) +
    1) / 2``, a conditional distribution over the batch, ``p(j | i) = K(x_i, x_j) / Σ_k K(x_i,
    x_k)``; the student matches the teacher's with ``Σ p_t log((p_t + eps) / (p_s + eps))``.
    Only directions matter, so student and teacher may have any dimensions; no adapter.

    Shapes: ``[B, ...]`` and ``[B, ...]``, flattened per sample; at least 2 samples. Reduction:
    the mean over all ``B×B`` entries (the batch-mean KL divided by B), as in the authors' code,
    which also keeps each sample's similarity to itself (``j = i``) in the distribution; the
    paper's definition leaves it out. ``eps`` guards the norms and the logarithm as in the
    authors' code; because of it the value can dip below 0 by about ``eps``. Typical term
    weight: 30000 (mdistiller, RepDistiller).
    """
    if student_feature.dim() < 1 or teacher_feature.dim() < 1:
        raise ValueError("pkt: features need a batch dimension")
    batch = student_feature.shape[0]
    if teacher_feature.shape[0] != batch:
        raise ValueError(
            f"pkt: student and teacher batch sizes differ ({batch} vs {teacher_feature.shape[0]})"
        )
    if batch < 2:
        raise ValueError(f"pkt: relations need at least 2 samples in the batch, got {batch}")
    p_s = _conditional_probabilities(student_feature.float().reshape(batch, -1), eps)
    p_t = _conditional_probabilities(teacher_feature.float().reshape(batch, -1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
