"""Box-regression distillation for CenterNet-style detectors: the student's size and offset maps
imitate the teacher's where the teacher sees an object.

A detector's regression output means something only where there is an object, so the imitation is
weighted by the teacher's confidence, its largest class score ``max_k sigmoid(heatmap)`` at each
position. Chen et al. (2017, "Learning Efficient Object Detection Models with Knowledge
Distillation") distil regression through the teacher too, with a bound on the student's error
relative to the teacher's; here the student imitates the teacher's maps directly. Unlike the
ground-truth L1 at centre cells, it also trains the regression around the centres, where a
neighbouring peak may win at test time.
"""

from __future__ import annotations

import torch

from distill.losses.centernet import head_outputs
from distill.losses.registry import register_loss


def _example(generator: torch.Generator) -> dict:
    """Teacher ``[heatmap [2, 3, 8, 8], size, offset]``, student ``[size, offset]`` (``[2, 2, 8, 8]`` each);
    the student at a match is the teacher's size and offset."""
    size, offset = 4 * torch.rand(2, 2, 8, 8, generator=generator), torch.rand(2, 2, 8, 8, generator=generator)
    teacher = [torch.randn(2, 3, 8, 8, generator=generator), size, offset]
    student = [4 * torch.rand(2, 2, 8, 8, generator=generator), torch.rand(2, 2, 8, 8, generator=generator)]
    return {"student": student, "teacher": teacher, "student_at_match": [size.clone(), offset.clone()]}


@register_loss("box_kd", inputs=("student", "teacher"), example=_example)
def box_kd_loss(
    student_outputs: list[torch.Tensor],
    teacher_outputs: list[torch.Tensor],
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> torch.Tensor:
    """Σ c · (``size_weight`` · |Δsize| + ``offset_weight`` · |Δoffset|) / Σ c over positions and images,
    where ``c = max_k sigmoid(teacher heatmap)`` and ``|Δ·|`` is the L1 distance between student and
    teacher averaged over the two coordinates (in output cells; the weights are CenterNet's).

    ``student_outputs``: ``[size, offset]`` (``student: [size, offset]``), each ``[B, 2, H, W]``;
    ``teacher_outputs``: ``[heatmap [B, K, H, W], size, offset]`` (``teacher: [heatmap, size,
    offset]``). The confidence is the teacher's, with no gradient.
    """
    s_size, s_offset = head_outputs(student_outputs, 2, "box_kd (student)", "student: [size, offset]")
    t_heat, t_size, t_offset = head_outputs(teacher_outputs, 3, "box_kd (teacher)", "teacher: [heatmap, size, offset]")
    if s_size.shape != t_size.shape or s_offset.shape != t_offset.shape:
        raise ValueError(
            f"box_kd: student size/offset {tuple(s_size.shape)}/{tuple(s_offset.shape)} and teacher "
            f"{tuple(t_size.shape)}/{tuple(t_offset.shape)} differ in shape"
        )
    confidence = torch.sigmoid(t_heat.detach().float()).amax(1)  # [B, H, W]
    error = (size_weight * (s_size.float() - t_size.float()).abs().mean(1)
             + offset_weight * (s_offset.float() - t_offset.float()).abs().mean(1))
    return (confidence * error).sum() / confidence.sum().clamp_min(1e-6)
