"""Transforms applied to each training batch by the trainer, seeded per step.

A transform is ``fn(batch, generator) -> batch``; the trainer seeds ``generator`` from the run's
seed, the epoch and the step, so a resumed run replays the same transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill.data.augment import mixup_inputs, random_shift

BatchTransform = Callable[[dict, torch.Generator], dict]


def shift_transform(max_shift: int) -> BatchTransform:
    """Random shifts of 1-D signals (``[B, L]`` or ``[B, C, L]`` inputs)."""

    def transform(batch: dict, generator: torch.Generator) -> dict:
        return {**batch, "input": random_shift(batch["input"], generator, max_shift)}

    return transform


def mixup_transform(alpha: float) -> BatchTransform:
    """Function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient
    and consistent"): student and teacher both see mixup-interpolated inputs, and the teacher's
    outputs are the only targets, so the labels are dropped."""

    def transform(batch: dict, generator: torch.Generator) -> dict:
        return {**batch, "input": mixup_inputs(batch["input"], generator, alpha), "target": None}

    return transform


def compose(*transforms: BatchTransform | None) -> BatchTransform | None:
    """Apply the given transforms in order (``None`` entries are skipped)."""
    chain = [t for t in transforms if t is not None]
    if not chain:
        return None
    if len(chain) == 1:
        return chain[0]

    def transform(batch: dict, generator: torch.Generator) -> dict:
        for step in chain:
            batch = step(batch, generator)
        return batch

    return transform
