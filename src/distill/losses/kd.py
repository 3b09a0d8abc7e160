"""Soft-target distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss("kd", inputs=("student", "teacher"))
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², computed in log space.

    Shapes: ``[B, C]`` (or ``[B, ..., C]``, every leading position is a sample). Reduction: sum over
    classes, mean over samples. The T² factor keeps gradient magnitudes comparable across
    temperatures, as the paper prescribes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (do teacher and student have the "
            "same number of classes?)"
        )
    classes = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2
