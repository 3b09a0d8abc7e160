"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge
Distillation", CVPR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


def _flat_logits_and_labels(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, C]`` float32 logits and ``[N]`` labels, after checking shapes and label range."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (do teacher and student have the "
            "same number of classes?)"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"{name}: logits must be [B, C], got {tuple(student_logits.shape)}")
    classes = student_logits.shape[-1]
    if classes < 2:
        raise ValueError(f"{name}: needs at least 2 classes, got {classes}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name}: labels must be integer class indices, got dtype {labels.dtype} "
            "(soft or one-hot targets are not supported)"
        )
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    labels = labels.reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {classes - 1}], got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return (
        student_logits.float().reshape(-1, classes),
        teacher_logits.float().reshape(-1, classes),
        labels.long(),
    )


@register_loss("dkd", inputs=("student", "teacher", "labels"))
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """``alpha · TCKD + beta · NCKD``, both at temperature T and scaled by T².

    The classic KD loss splits per sample into ``KL(p_t ‖ p_s) = TCKD + (1 − p_t[y]) · NCKD``;
    DKD drops the teacher-confidence factor and weights the two parts freely:

    - TCKD: KL between the binary distributions ``[p[y], 1 − p[y]]`` (target vs the rest);
    - NCKD: KL between the distributions over the non-target classes, ``p[k] / (1 − p[y])``.

    Shapes: logits ``[B, C]`` (or ``[B, ..., C]``: every leading position is a sample), labels the
    leading shape (``[B]``) of class indices. Reduction: sum over classes, mean over samples, each
    term times T², as in the authors' code (mdistiller). Computed in float32 in log space, with the
    target class left out of NCKD exactly (the official code subtracts 1000 from its logit).

    Defaults (alpha 1, beta 8, T 4) are mdistiller's CIFAR-100 settings; its ImageNet settings are
    beta 0.5, T 1. The paper also ramps the whole DKD term up linearly over the first 20 epochs
    (CIFAR-100; 1 on ImageNet): that warm-up belongs to the term's weight in the objective
    (``Term(..., warmup_epochs=20)``), not to this loss.
    """
    if temperature <= 0:
        raise ValueError(f"dkd: temperature must be positive, got {temperature}")
    s, t, y = _flat_logits_and_labels("dkd", student_logits, teacher_logits, labels)
    n, classes = s.shape
    if n == 0:
        raise ValueError("dkd: the batch is empty")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)

    target = F.one_hot(y, classes).bool()
    others = ~target

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        # log of [p[y], 1 - p[y]], with 1 - p[y] as a log-sum-exp over the other classes
        log_target = log_p.gather(1, y[:, None])
        log_rest = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1, keepdim=True)
        return torch.cat([log_target, log_rest], dim=1)

    log_b_s, log_b_t = binary(log_p_s), binary(log_p_t)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="none", log_target=True).sum(1)

    # non-target classes only: renormalise the logits without the target column
    s_rest = (s / temperature)[others].reshape(n, classes - 1)
    t_rest = (t / temperature)[others].reshape(n, classes - 1)
    nckd = F.kl_div(
        F.log_softmax(s_rest, dim=-1), F.log_softmax(t_rest, dim=-1), reduction="none", log_target=True
    ).sum(1)

    return (alpha * tckd.mean() + beta * nckd.mean()) * temperature**2
