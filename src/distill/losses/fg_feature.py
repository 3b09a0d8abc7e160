"""Feature imitation with foreground and background weights, the focal part of FGD (Yang et al.
2022, "Focal and Global Knowledge Distillation for Detectors").

Teacher and student features differ most inside objects, and background cells outnumber object
cells by far; imitating every cell alike lets the background dominate. FGD splits the map with the
ground-truth boxes, weights each foreground cell by the inverse area of its box (small objects
count as much as large ones) and each background cell by the inverse number of background cells,
and weighs the two parts separately. Left out here: FGD's teacher attention masks and its global
(GcBlock relation) loss; MGD's random masking and generation block (Yang et al. 2022, "Masked
Generative Distillation") is another way to the same end.
"""

from __future__ import annotations

import torch

from distill.boxes import unpack_targets
from distill.losses.centernet import example_target
from distill.losses.registry import register_loss


def foreground_weights(
    boxes: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], stride: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell weights of an ``[H, W] = size`` feature map at ``stride`` input pixels per cell.

    ``boxes`` ``[B, M, 4]`` in input pixels, ``mask`` ``[B, M]`` the real ones. A cell is foreground
    when its centre ``((x + 0.5) · stride, (y + 0.5) · stride)`` lies inside a box; it then weighs
    ``1 / (cells of that box)``, the smallest such box when several cover it (FGD's scale mask).
    Each background cell weighs ``1 / (background cells of its image)``. Returns
    ``(foreground [B, H, W], background [B, H, W])``: a box that overlaps no other has foreground
    weights summing to 1, and an image's background weights sum to 1 (0 with no background).
    """
    height, width = size
    ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    b = boxes.float()
    inside = (
        (xs.view(1, 1, 1, -1) >= b[..., 0, None, None]) & (xs.view(1, 1, 1, -1) < b[..., 2, None, None])
        & (ys.view(1, 1, -1, 1) >= b[..., 1, None, None]) & (ys.view(1, 1, -1, 1) < b[..., 3, None, None])
        & mask.bool()[..., None, None]
    )  # [B, M, H, W]
    cells = inside.flatten(2).sum(-1).float()  # [B, M]
    scale = torch.where(inside, 1 / cells.clamp_min(1)[..., None, None], torch.zeros((), device=boxes.device))
    foreground = scale.amax(dim=1) if scale.shape[1] else boxes.new_zeros(len(boxes), height, width)
    background = (~inside.any(1)).float()
    background = background / background.flatten(1).sum(1).clamp_min(1)[:, None, None]
    return foreground, background


def _example(generator: torch.Generator) -> dict:
    """Adapted student and teacher features ``[2, 4, 8, 8]`` (stride 4 on 32×32 images) and their boxes."""
    student, teacher = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
    return {"student": student, "teacher": teacher, "labels": example_target()}


@register_loss("fg_feature", inputs=("student", "teacher", "labels"), adapts=True, example=_example)
def fg_feature_loss(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    target: dict[str, torch.Tensor],
    fg_weight: float = 1.0,
    bg_weight: float = 0.5,
    stride: float = 4.0,
) -> torch.Tensor:
    """``fg_weight`` · Σ_fg w·e + ``bg_weight`` · Σ_bg w·e, mean over images, where ``e`` is the squared
    error between the adapted student feature and the teacher feature at a cell, averaged over
    channels, and ``w`` the weights of :func:`foreground_weights` (``stride``: input pixels per
    feature cell). FGD's ratio of foreground to background weight is 2:1 (α = 2β).

    Shapes: features ``[B, C, H, W]`` (the adapter, a 1×1 convolution to the teacher's channels,
    is applied by the objective first); ``target``: the batch's target dict.
    """
    if student_feature.shape != teacher_feature.shape or student_feature.dim() != 4:
        raise ValueError(
            f"fg_feature: adapted student feature {tuple(student_feature.shape)} and teacher feature "
            f"{tuple(teacher_feature.shape)} must be the same [B, C, H, W]"
        )
    boxes, _, mask = (t.to(student_feature.device) for t in unpack_targets(target))
    foreground, background = foreground_weights(boxes, mask, tuple(student_feature.shape[-2:]), stride)
    error = (student_feature.float() - teacher_feature.float()).pow(2).mean(1)  # [B, H, W]
    per_image = (fg_weight * foreground * error + bg_weight * background * error).flatten(1).sum(1)
    return per_image.mean()
