"""Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer", arXiv:1707.01219)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss, shapes_example


@register_loss("nst", inputs=("student", "teacher"), example=shapes_example((8, 3, 6, 6), (8, 5, 6, 6)))
def nst_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Squared MMD, with the polynomial kernel ``k(x, y) = (xᵀy)²``, between the channels.

    Each channel's spatial map is one sample of a distribution (its "neuron selectivity
    pattern"), flattened over positions and L2-normalised (a dead, all-zero channel stays zero,
    as with ``F.normalize`` in the reference implementations). Per image, with ``s_j`` the student's
    ``C_s`` channel vectors and ``t_i`` the teacher's ``C_t``::

        MMD² = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') − 2 · mean_{i,j} k(t_i, s_j)

    which is the kernel the paper recommends (polynomial, d = 2, c = 0). The channel counts may
    differ, so no adapter is needed. For this kernel the MMD² also equals
    ``‖SᵀS / C_s − TᵀT / C_t‖²_F`` with S, T the ``[C, H·W]`` channel matrices; the cheaper of the
    two forms is used (channel Gram matrices are ``C×C``, spatial ones ``HW×HW``).

    Shapes: ``[B, C_s, H_s, W_s]`` and ``[B, C_t, H_t, W_t]``. Where the spatial sizes differ,
    both features are average-pooled (adaptive) to ``(min(H_s, H_t), min(W_s, W_t))`` first,
    as mdistiller and RepDistiller do. Reduction: mean over the batch of each image's MMD².
    The paper's ``λ/2`` with ``λ = 50`` (mdistiller uses 50) is the term weight.
    """
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise ValueError(
            "nst: needs convolutional feature maps [B, C, H, W], got student "
            f"{tuple(student_feature.shape)} and teacher {tuple(teacher_feature.shape)}"
        )
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            f"nst: student and teacher batch sizes differ ({student_feature.shape[0]} vs "
            f"{teacher_feature.shape[0]})"
        )
    if student_feature.shape[0] == 0:
        raise ValueError("nst: the batch is empty")
    f_s, f_t = student_feature.float(), teacher_feature.float()
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    batch, c_s, c_t = f_s.shape[0], f_s.shape[1], f_t.shape[1]
    s = F.normalize(f_s.reshape(batch, c_s, -1), dim=2)
    t = F.normalize(f_t.reshape(batch, c_t, -1), dim=2)
    positions = s.shape[2]

    if positions * positions <= c_s * c_s + c_t * c_t + c_s * c_t:
        gram_s = s.transpose(1, 2) @ s / c_s  # [B, HW, HW]
        gram_t = t.transpose(1, 2) @ t / c_t
        per_image = (gram_s - gram_t).pow(2).sum(dim=(1, 2))
    else:
        k_ss = (s @ s.transpose(1, 2)).pow(2).mean(dim=(1, 2))
        k_tt = (t @ t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
        k_st = (s @ t.transpose(1, 2)).pow(2).mean(dim=(1, 2))
        per_image = k_tt + k_ss - 2 * k_st
    return per_image.mean()
