"""Cosine distance between embeddings: a student's sentence (or any) embedding matches its
teacher's direction (as in sentence-embedding distillation, e.g. Reimers & Gurevych 2020,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", which uses MSE;
the cosine ignores the length, which a normalised embedding does not use)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


@register_loss("embedding_cosine", inputs=("student", "teacher"), adapts=True)
def embedding_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` along the last dimension, averaged over every other position.

    ``student`` is already adapted to the teacher's shape (``[B, D]``, or ``[B, T, D]`` for token
    features). Zero when every student vector points where its teacher's does; in ``[0, 2]``.
    Reduction: mean over the batch (and positions).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"embedding_cosine: adapted student {tuple(student.shape)} does not match the teacher {tuple(teacher.shape)}"
        )
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
