"""Ranking Distillation (Tang & Wang 2018, "Ranking Distillation: Learning Compact Ranking Models
With High Performance for Recommender System", KDD).

The teacher's top-K *unobserved* items for a user are treated as extra, weighted positives:

    L_D = - sum_{r=1..K} w_r · log sigmoid(s_{pi_r})

where ``pi_r`` is the item the teacher ranks r-th among the items the user has not interacted
with. The paper combines it with the student's own ranking loss as ``(1 - alpha) L_R + alpha L_D``:
here that is two terms, e.g. ``bce`` with weight ``1 - alpha`` and ``rd`` with weight ``alpha``.

Weights (section 3.3 of the paper):

- position importance: ``w^a_r ∝ exp(-r / lambda)``, normalised over the K positions; a small
  ``lambda`` puts nearly all weight on the first few items;
- ranking discrepancy: ``w^b_r = tanh(max(mu · (rhat_r - r), 0))``, where ``rhat_r`` is the
  student's rank of item ``pi_r``: items the student already ranks as high as the teacher get no
  weight, items it ranks far lower get up to 1;
- hybrid: ``w_r = w^a_r w^b_r / sum_i w^a_i w^b_i``. The paper trains with ``w^a`` alone for the
  first epochs (the student's ranks are noise at first) and the hybrid afterwards:
  ``weighting="position"`` then ``"hybrid"``.

The paper estimates ``rhat`` by sampling items at random and scaling the number that the student
scores higher up to the catalogue. Here the sample is the candidate list itself: ``rhat_r = 1 +
#{unobserved candidates j != pi_r with s_j > s_{pi_r}}``, scaled by ``(num_items - 1) /
(unobserved candidates - 1)`` when ``num_items`` is given (exact for a list of uniformly sampled
negatives; the list's own top-K items make it a slight over-estimate of the student's rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss

WEIGHTINGS = ("hybrid", "position")


@torch.no_grad()
def rd_weights(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    lam: float = 1.0,
    mu: float = 0.1,
    weighting: str = "hybrid",
    num_items: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` unobserved candidates and their weights (no gradient).

    Returns ``(columns, weights)``, both ``[B, k']`` with ``k' = min(k, L)``: ``columns`` index the
    candidate list; ``weights`` sum to 1 per row, or are all 0 where no candidate is left to
    distil (a list without unobserved items, or, with hybrid weighting, a student that already
    ranks every top-K item at least as high as the teacher).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"rd: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"rd: k must be a positive integer, got {k!r}")
    if lam <= 0:
        raise ValueError(f"rd: lam (the paper's lambda) must be positive, got {lam}")
    if mu <= 0:
        raise ValueError(f"rd: mu must be positive, got {mu}")
    s, t = student_scores.float(), teacher_scores.float()
    unobserved = labels <= 0  # observed positives (label 1) are never distilled
    k = min(k, s.shape[-1])
    top, columns = t.masked_fill(~unobserved, -math.inf).topk(k, dim=-1)
    present = torch.isfinite(top)  # fewer than k unobserved candidates in this list
    positions = torch.arange(1, k + 1, device=s.device, dtype=torch.float32)
    weights = torch.exp(-positions / lam).expand_as(top) * present
    if weighting == "hybrid":
        picked = s.gather(-1, columns)  # [B, k]
        higher = (s[:, None, :] > picked[:, :, None]) & unobserved[:, None, :]  # [B, k, L]
        count = higher.sum(-1).float()
        if num_items is not None:
            others = (unobserved.sum(-1, keepdim=True) - 1).clamp(min=1).float()
            count = count * (num_items - 1) / others
        student_rank = 1 + count
        weights = weights * torch.tanh((mu * (student_rank - positions)).clamp(min=0))
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp(min=1e-30), torch.zeros_like(weights))
    return columns, weights


def _example(generator: torch.Generator) -> dict:
    """Scores ``[4, 12]`` of 12 candidates for 4 users; candidate 0 is each user's observed positive,
    the rest sampled negatives (0) or unlabelled (-1)."""
    labels = torch.randint(-1, 1, (4, 12), generator=generator)
    labels[:, 0] = 1
    student, teacher = (torch.randn(4, 12, generator=generator) * 2 for _ in range(2))
    return {"student": student, "teacher": teacher, "labels": labels}


@register_loss(
    "rd", inputs=("student", "teacher", "labels"), example=_example,
    exempt={"zero_at_match": "the teacher only picks which of the student's scores to raise: "
                             "-log sigmoid(s) at the teacher's top items is positive whatever s is"},
)
def rd_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    labels: torch.Tensor,
    k: int = 10,
    lam: float = 1.0,
    mu: float = 0.1,
    weighting: str = "hybrid",
    num_items: int | None = None,
) -> torch.Tensor:
    """Ranking Distillation's loss ``-sum_r w_r log sigmoid(s_{pi_r})``, mean over users.

    Shapes: ``student_scores``, ``teacher_scores`` and ``labels`` ``[B, L]``, one candidate list per
    user; a label ``> 0`` marks an item the user interacted with (never distilled), any other
    value (0 for a sampled negative, -1 for an unlabelled candidate) an unobserved one. ``k``,
    ``lam`` (the paper's λ) and ``mu`` (μ) are the paper's; ``weighting`` and ``num_items`` are
    explained in the module docstring. Weights carry no gradient.
    """
    if not student_scores.shape == teacher_scores.shape == labels.shape or student_scores.dim() != 2:
        raise ValueError(
            f"rd: needs student scores, teacher scores and labels of one shape [B, L], got "
            f"{tuple(student_scores.shape)}, {tuple(teacher_scores.shape)} and {tuple(labels.shape)}"
        )
    columns, weights = rd_weights(student_scores, teacher_scores, labels, k, lam, mu, weighting, num_items)
    picked = student_scores.float().gather(-1, columns)
    return -(weights * F.logsigmoid(picked)).sum(-1).mean()
