"""Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving
the Performance of Convolutional Neural Networks via Attention Transfer", ICLR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss, shapes_example


def _check_maps(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{name}: needs convolutional feature maps [B, C, H, W], got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student and teacher batch sizes differ ({student.shape[0]} vs "
            f"{teacher.shape[0]})"
        )
    if student.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention ``mean over channels of |f|^p``: ``[B, C, H, W] -> [B, H, W]``."""
    return feature.abs().pow(p).mean(dim=1)


@register_loss("at", inputs=("student", "teacher"), example=shapes_example((8, 3, 8, 8), (8, 5, 4, 4)))
def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Squared difference of L2-normalised spatial attention maps.

    Each map is ``mean over channels of |f|^p``, flattened per sample and divided by its L2 norm,
    so the student and teacher may have any numbers of channels and no adapter is needed.

    Shapes: ``[B, C_s, H_s, W_s]`` and ``[B, C_t, H_t, W_t]``. Where the spatial sizes differ,
    both attention maps are average-pooled (adaptive) to ``(min(H_s, H_t), min(W_s, W_t))``
    before normalising. Pooling the one-channel attention map (the activation energy of each
    region) rather than the feature keeps positive and negative activations from cancelling;
    mdistiller and RepDistiller pool the feature instead. Reduction: mean over the batch and the
    positions of the squared difference, ``(a_s − a_t)².mean()``, as in the authors' code, i.e.
    ``‖a_s − a_t‖² / (H·W)`` averaged over samples. The paper's ``β/2`` with ``β = 1000`` (per
    pair of maps) is the term weight; p = 2 is the paper's choice.
    """
    if p <= 0:
        raise ValueError(f"at: p must be positive, got {p}")
    _check_maps("at", student_feature, teacher_feature)
    a_s = attention_map(student_feature.float(), p)
    a_t = attention_map(teacher_feature.float(), p)
    size = (min(a_s.shape[1], a_t.shape[1]), min(a_s.shape[2], a_t.shape[2]))
    if tuple(a_s.shape[1:]) != size:
        a_s = F.adaptive_avg_pool2d(a_s[:, None], size)[:, 0]
    if tuple(a_t.shape[1:]) != size:
        a_t = F.adaptive_avg_pool2d(a_t[:, None], size)[:, 0]
    batch = a_s.shape[0]
    a_s = F.normalize(a_s.reshape(batch, -1), dim=1)
    a_t = F.normalize(a_t.reshape(batch, -1), dim=1)
    return (a_s - a_t).pow(2).mean()
