"""Cosine-similarity regression on scored sentence pairs: sentence-transformers'
``CosineSimilarityLoss`` (Reimers & Gurevych 2019, "Sentence-BERT"), the way an encoder learns
semantic similarity from labelled pairs (STS-B train) without a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.registry import register_loss


def _example(generator: torch.Generator) -> dict:
    """Embeddings ``[8, 5]`` of 4 sentence pairs; gold scores ``[4]``, the last pair unscored (nan)."""
    scores = torch.rand(4, generator=generator) * 5
    scores[-1] = float("nan")
    return {"student": torch.randn(8, 5, generator=generator), "labels": scores}


@register_loss(
    "pair_cosine", inputs=("student", "labels"), example=_example,
    exempt={"batch_order": "its rows are interleaved pairs ([2B, D] embeddings for B scores): "
                           "permuting the rows breaks the pairs"},
)
def pair_cosine_loss(embeddings: torch.Tensor, scores: torch.Tensor, *, max_score: float = 5.0) -> torch.Tensor:
    """Squared error between ``cos(u_i, v_i)`` and ``scores[i] / max_score``.

    ``embeddings`` ``[2B, D]`` holds the pairs interleaved (rows ``2i`` and ``2i + 1`` are pair
    ``i``'s two sentences, as :class:`distill.tasks.sentence_embedding.PairLoader` batches them);
    ``scores`` ``[B]`` are gold similarities in ``[0, max_score]``, ``nan`` for an unscored pair
    (two unlabelled sentences), which is skipped. Reduction: mean over the scored pairs; zero (with
    a gradient path) when the batch has none.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] != 2 * scores.shape[0]:
        raise ValueError(
            f"pair_cosine: expected [2B, D] embeddings for B = {scores.shape[0]} pairs, got {tuple(embeddings.shape)}"
        )
    cos = F.cosine_similarity(embeddings[0::2].float(), embeddings[1::2].float(), dim=-1)
    target = scores.float() / max_score
    scored = ~torch.isnan(target)
    if not bool(scored.any()):
        return cos.sum() * 0.0
    return F.mse_loss(cos[scored], target[scored])
