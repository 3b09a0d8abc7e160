"""KD with logit standardisation (Sun, Ren, Li, Wang & Cao 2024, "Logit Standardization in
Knowledge Distillation", CVPR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


def _zscore(logits: torch.Tensor, eps: float) -> torch.Tensor:
    # unbiased standard deviation and eps added to it, as in the authors' code
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


@register_loss("kd_std", inputs=("student", "teacher"))
def kd_std_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """``KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)) · T²`` with ``Z`` the per-sample z-score.

    Each sample's logits are standardised (minus their mean, divided by their standard
    deviation), the student's and the teacher's separately, before the usual soft-target loss.
    The student then has to match the teacher's logit *relations*, not their range: the loss is
    unchanged when the student's logits of a sample are shifted or scaled by a positive factor.

    Shapes: ``[B, C]`` (or ``[B, ..., C]``: every leading position is a sample), at least 2
    classes. Reduction: sum over classes, mean over samples, times T² (the authors' code keeps the
    factor). The standard deviation is the unbiased one (``torch.std``) plus ``eps``, as in the
    authors' code. Default temperature 2 is the paper's base temperature for CIFAR-100 (the
    authors pair it with a KD term weight of 9).
    """
    if temperature <= 0:
        raise ValueError(f"kd_std: temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_std: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (do teacher and student have the "
            "same number of classes?)"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(
            f"kd_std: logits need a class dimension of at least 2, got {tuple(student_logits.shape)}"
        )
    classes = student_logits.shape[-1]
    s = _zscore(student_logits.float().reshape(-1, classes), eps)
    t = _zscore(teacher_logits.float().reshape(-1, classes), eps)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2
