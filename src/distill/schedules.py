"""Learning-rate schedules as pure functions of progress (resumable: no hidden state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("constant", "cosine", "step", "linear")


def learning_rate(
    base_lr: float,
    epoch: float,
    epochs: int,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """The learning rate at fractional ``epoch`` (e.g. 2.5 = half-way through the third epoch).

    ``step`` multiplies by ``gamma`` at each milestone epoch (the CIFAR protocol: 150/180/210);
    ``cosine`` and ``linear`` decay to ``min_lr`` at ``epochs``; a linear warm-up from 0 precedes all.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * (epoch + 1e-8) / warmup_epochs
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    span = max(epochs - warmup_epochs, 1e-8)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr + (base_lr - min_lr) * (1 - progress)
    raise ValueError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
