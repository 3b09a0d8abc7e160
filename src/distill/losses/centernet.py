"""The CenterNet detection loss (Zhou, Wang & Krähenbühl 2019, "Objects as Points"): the student's
training loss on ground-truth boxes, with no teacher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distill.boxes import encode_targets, gather_cells, unpack_targets
from distill.losses.registry import register_loss


def head_outputs(value, count: int, loss: str, taps: str) -> list[torch.Tensor]:
    """The list of ``count`` head tensors a detection loss reads (the term's tap list)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) != count:
        got = "one tensor" if isinstance(value, torch.Tensor) else f"{len(value)} tensors"
        raise ValueError(f"{loss} reads {count} head outputs, got {got}; tap them as {taps}")
    return list(value)


def example_target() -> dict[str, torch.Tensor]:
    """A target dict for two 32×32 images (8×8 maps at stride 4, 3 classes): two boxes in the first,
    one in the second (its second row is padding)."""
    return {
        "boxes": torch.tensor([[[2.0, 3.0, 14.0, 17.0], [18.0, 6.0, 30.0, 28.0]], [[5.0, 5.0, 20.0, 25.0], [0.0] * 4]]),
        "labels": torch.tensor([[0, 2], [1, 0]]),
        "mask": torch.tensor([[True, True], [True, False]]),
    }


def _example(generator: torch.Generator) -> dict:
    """Head outputs ``[heatmap [2, 3, 8, 8], size [2, 2, 8, 8], offset [2, 2, 8, 8]]`` and :func:`example_target`."""
    heads = [torch.randn(2, 3, 8, 8, generator=generator), 4 * torch.rand(2, 2, 8, 8, generator=generator),
             torch.rand(2, 2, 8, 8, generator=generator)]
    return {"student": heads, "labels": example_target()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (after CornerNet, Law & Deng 2018).

    ``logits``, ``target`` ``[B, K, H, W]``; ``target`` is 1 at object centres and a Gaussian
    bump below 1 around them. With ``p = sigmoid(logits)``: ``-(1 - p)^alpha log p`` at centres and
    ``-(1 - target)^beta p^alpha log(1 - p)`` elsewhere. Reduction: sum over everything, divided
    by the number of centres (at least 1).
    """
    logits = logits.float()
    positive = target.eq(1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos = -((1 - p) ** alpha) * log_p * positive
    neg = -((1 - target) ** beta) * (p ** alpha) * log_not_p * (1 - positive)
    return (pos.sum() + neg.sum()) / positive.sum().clamp_min(1)


@register_loss("centernet", inputs=("student", "labels"), example=_example)
def centernet_loss(
    outputs: list[torch.Tensor],
    target: dict[str, torch.Tensor],
    stride: int = 4,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
    alpha: float = 2.0,
    beta: float = 4.0,
    min_overlap: float = 0.7,
    min_radius: int = 1,
) -> torch.Tensor:
    """Focal loss on the class heat-map + ``size_weight`` · L1 on box size + ``offset_weight`` · L1 on
    the centre offset, CenterNet's defaults (0.1 and 1).

    ``outputs``: the student's ``[heatmap [B, K, H, W], size [B, 2, H, W], offset [B, 2, H, W]]``
    (the term's ``student: [heatmap, size, offset]``); ``target``: the batch's target dict
    (:func:`distill.boxes.unpack_targets`), boxes in input pixels, ``stride`` the heads'
    output stride. Targets are built by :func:`~distill.boxes.encode_targets`
    (``min_overlap``, ``min_radius``: the Gaussian's radius rule); the L1
    terms are read at each object's centre cell only, in output cells, averaged over objects and
    the two coordinates. Reduction: a scalar as described.
    """
    heatmap, size, offset = head_outputs(outputs, 3, "centernet", "student: [heatmap, size, offset]")
    boxes, labels, mask = (t.to(heatmap.device) for t in unpack_targets(target))
    encoded = encode_targets(
        boxes, labels, mask, heatmap.shape[1], tuple(heatmap.shape[-2:]), stride, min_overlap, min_radius
    )
    valid = encoded["mask"].unsqueeze(-1).float()  # [B, M, 1]
    count = (valid.sum() * 2).clamp_min(1)
    size_l1 = ((gather_cells(size.float(), encoded["cell"]) - encoded["size"]).abs() * valid).sum() / count
    offset_l1 = ((gather_cells(offset.float(), encoded["cell"]) - encoded["offset"]).abs() * valid).sum() / count
    return focal_loss(heatmap, encoded["heatmap"], alpha, beta) + size_weight * size_l1 + offset_weight * offset_l1
