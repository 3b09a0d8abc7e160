"""Several teachers as one: the weighted average of their logits or of their probabilities.

    teacher = TeacherEnsemble([resnet_a, resnet_b, wrn], weights=[1, 1, 2], combine="probs")
    Distiller(student, teacher, terms)         # any loss that reads teacher logits

The ensemble is an ``nn.Module``, so everything that takes a teacher takes it: a live signal, a
cache, evaluation, taps (``members.0.layer3`` reaches into one member).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.errors import DistillError
from distill.taps import output_tensor

COMBINE = ("logits", "probs")


class TeacherEnsemble(nn.Module):
    """Average of ``members``' outputs, ``[B, C]`` logits each.

    ``combine="logits"``: the weighted mean of the logits. ``combine="probs"``: the log of the
    weighted mean of the softmax probabilities, so ``softmax`` of the output is the averaged
    distribution (at temperature 1; losses at temperature T then soften that distribution's log,
    which is how most ensemble-KD code uses it). ``weights`` default to equal and are normalised.
    """

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, combine: str = "logits"
    ) -> None:
        super().__init__()
        if len(members) < 1:
            raise DistillError("an ensemble needs at least one teacher")
        if combine not in COMBINE:
            raise DistillError(f"ensemble combine must be one of {', '.join(COMBINE)}, got '{combine}'")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise DistillError(f"ensemble has {len(members)} teachers but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DistillError(f"ensemble weights must be >= 0 with a positive sum, got {weights}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        # Buffers (in the state_dict), so a teacher cache's fingerprint covers how members are combined.
        self.register_buffer("weights", torch.tensor(weights) / sum(weights))
        self.register_buffer("combine_probs", torch.tensor(combine == "probs"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [output_tensor(m(x)) for m in self.members]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise DistillError(f"ensemble members disagree on output shape: {sorted(shapes)}")
        stacked = torch.stack([o.float() for o in outputs])  # [M, B, C]
        w = self.weights.to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
        if self.combine == "logits":
            return (w * stacked).sum(0)
        # log Σ w_m softmax(z_m) computed stably in log space
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1) + torch.log(w.clamp_min(1e-30)), dim=0)
