"""DIST: distillation from a stronger teacher by matching relations (Huang, You, Wang, Qian &
Xu 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS)."""

from __future__ import annotations

import torch

from distill.losses.registry import register_loss


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Pearson correlation between matching rows of ``a`` and ``b`` ([N, M] -> [N])."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist", inputs=("student", "teacher"))
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``T² · (beta · inter + gamma · intra)`` on ``softmax(z / T)``.

    - inter-class relation: ``1 − mean over samples of pearson(student row, teacher row)``, each
      row a sample's class probabilities;
    - intra-class relation: the same with the roles transposed, each column a class's
      probabilities across the batch.

    Matching correlations instead of the probabilities themselves leaves the student free in
    scale and shift, which the paper argues suits a much stronger teacher.

    Shapes: logits ``[B, C]`` (or ``[B, ..., C]``: every leading position is a sample, as the
    authors do for segmentation maps); at least 2 samples and 2 classes. Reduction: the means
    above; each relation term lies in ``[0, 2]``. ``eps`` is added to the correlation's
    denominator as in the authors' code, so a class whose probability is nearly constant over the
    batch (centred norm ≲ √eps) counts as uncorrelated even for identical inputs: the loss of
    identical inputs is exactly 0 only with ``eps=0``. Defaults (beta 1, gamma 1, T 1) are the
    authors' code defaults (their ImageNet setting); CIFAR-100 set-ups built on it commonly use
    beta = gamma = 2, T = 4.
    """
    if temperature <= 0:
        raise ValueError(f"dist: temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"dist: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (do teacher and student have the "
            "same number of classes?)"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"dist: logits must be [B, C], got {tuple(student_logits.shape)}")
    classes = student_logits.shape[-1]
    y_s = (student_logits.float().reshape(-1, classes) / temperature).softmax(dim=1)
    y_t = (teacher_logits.float().reshape(-1, classes) / temperature).softmax(dim=1)
    if y_s.shape[0] < 2 or classes < 2:
        raise ValueError(
            f"dist: needs at least 2 samples and 2 classes (correlations over a single value are "
            f"undefined), got logits {tuple(student_logits.shape)}"
        )
    inter = 1 - _pearson_rows(y_s, y_t, eps).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t(), eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)
