"""Relational KD (Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation", CVPR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss, shapes_example


def _differences(x: torch.Tensor) -> torch.Tensor:
    """``diff[j, i] = x_i - x_j`` for ``[B, D]`` -> ``[B, B, D]``, exact (no ``|a|²+|b|²-2ab``)."""
    return x[None, :, :] - x[:, None, :]


def _distances(diff: torch.Tensor, eps: float) -> torch.Tensor:
    """Pairwise distances ``[B, B]`` divided by their mean over the pairs ``i != j``."""
    batch = diff.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=diff.device)
    # clamp before the square root: its gradient at 0 is infinite (the diagonal is masked anyway)
    dist = diff.pow(2).sum(-1).clamp_min(eps).sqrt() * off_diagonal
    mu = dist.sum() / (batch * (batch - 1))
    return dist / mu.clamp_min(eps)


def _angle_cosines(diff: torch.Tensor) -> torch.Tensor:
    """``cos[j, i, k]``: cosine of the angle at ``x_j`` between ``x_i`` and ``x_k``, ``[B, B, B]``.

    Triplets with a repeated vertex have a zero difference vector and give 0.
    """
    unit = F.normalize(diff, dim=2)
    return unit @ unit.transpose(1, 2)


@register_loss("rkd", inputs=("student", "teacher"), example=shapes_example((8, 7), (8, 4, 3)))
def rkd_loss(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``distance_weight · L_dist + angle_weight · L_angle`` on relations between samples.

    - distance-wise: ``ψ_D(i, j) = ‖x_i − x_j‖ / μ`` with ``μ`` the mean distance over the pairs
      ``i ≠ j`` of the batch; Huber (smooth L1, δ = 1) between the student's and the teacher's;
    - angle-wise: ``ψ_A(i, j, k) = cos ∠x_i x_j x_k`` (unit vectors from ``x_j``), same Huber.

    Both are invariant to rotating, translating and (the distances through ``μ``) scaling the
    embedding, so the student and teacher may have any dimensions; no adapter is needed.

    Shapes: ``[B, ...]`` and ``[B, ...]``, flattened per sample; at least 2 samples. Reduction:
    the mean over all ``B²`` ordered pairs and all ``B³`` triplets, including the degenerate ones
    (which contribute 0), as in the authors' code; the paper writes sums. ``eps`` keeps the
    distance's square root and ``μ`` away from 0. Defaults 25 and 50 (the paper's λ_RKD-D and
    λ_RKD-A) are those of mdistiller and RepDistiller; setting one to 0 gives RKD-D or RKD-A
    alone and skips its computation. Memory grows as ``B²·D`` (differences) and ``B³`` (angles).
    """
    if student_feature.dim() < 1 or teacher_feature.dim() < 1:
        raise ValueError("rkd: features need a batch dimension")
    batch = student_feature.shape[0]
    if teacher_feature.shape[0] != batch:
        raise ValueError(
            f"rkd: student and teacher batch sizes differ ({batch} vs {teacher_feature.shape[0]})"
        )
    if batch < 2:
        raise ValueError(f"rkd: relations need at least 2 samples in the batch, got {batch}")
    diff_s = _differences(student_feature.float().reshape(batch, -1))
    diff_t = _differences(teacher_feature.float().reshape(batch, -1))
    loss = diff_s.new_zeros(())
    if distance_weight:
        d_s, d_t = _distances(diff_s, eps), _distances(diff_t, eps)
        loss = loss + distance_weight * F.smooth_l1_loss(d_s, d_t, beta=1.0)
    if angle_weight:
        a_s, a_t = _angle_cosines(diff_s), _angle_cosines(diff_t)
        loss = loss + angle_weight * F.smooth_l1_loss(a_s, a_t, beta=1.0)
    return loss
