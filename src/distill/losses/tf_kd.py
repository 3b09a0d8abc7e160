"""Teacher-free KD with a manually designed teacher, Tf-KD_reg (Yuan, Tay, Li, Wang & Feng 2020,
"Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss("tf_kd", inputs=("student", "labels"))
def tf_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
) -> torch.Tensor:
    """KD from a virtual teacher that needs no teacher model: ``KL(p^d_T ‖ softmax(s/T)) · T²``.

    The virtual teacher puts probability ``a = correct_prob`` on the labelled class and spreads
    ``1 − a`` evenly over the other ``C − 1`` classes (a label-smoothing distribution, which the
    paper shows is a teacher of 100% accuracy). It is softened at temperature T like a real
    teacher's output: ``p^d_T ∝ (p^d)^(1/T)``, i.e. the softmax of ``log p^d / T``. The result
    is exactly the ``kd`` loss with ``log p^d`` as teacher logits; at T = 1 it equals cross-entropy
    with label smoothing minus the (constant) entropy of ``p^d``.

    Shapes: logits ``[B, C]`` (or ``[B, ..., C]``), labels the leading shape (``[B]``) of class
    indices; at least 2 classes. Reduction: sum over classes, mean over samples, times T² (the
    ``kd`` convention). Defaults (a 0.99, T 20) are the authors' code's values for CIFAR-100
    (``my_loss_function.py``, ``params.json``); they weight this term 0.1 next to 0.9 CE.
    The authors' code differs from the paper's equation and from this function: it softens
    ``p^d`` as if the probabilities were logits, leaves the student at T = 1, averages over
    B·C elements and multiplies by 100, so its term weights do not carry over.
    """
    if temperature <= 0:
        raise ValueError(f"tf_kd: temperature must be positive, got {temperature}")
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"tf_kd: correct_prob must lie in (0, 1), got {correct_prob}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(
            f"tf_kd: logits need a class dimension of at least 2, got {tuple(student_logits.shape)}"
        )
    classes = student_logits.shape[-1]
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"tf_kd: labels must be integer class indices, got dtype {labels.dtype} "
            "(soft or one-hot targets are not supported)"
        )
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"tf_kd: labels {tuple(labels.shape)} must have the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    y = labels.reshape(-1).long()
    if y.numel() == 0:
        raise ValueError("tf_kd: the batch is empty")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(
            f"tf_kd: labels must lie in [0, {classes - 1}], got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    s = student_logits.float().reshape(-1, classes)
    # the virtual teacher's log-probabilities, used as its logits
    log_rest = math.log((1.0 - correct_prob) / (classes - 1))
    teacher = torch.full_like(s, log_rest)
    teacher.scatter_(1, y[:, None], math.log(correct_prob))
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2
