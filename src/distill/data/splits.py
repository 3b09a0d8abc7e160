"""Holding out a validation split."""

from __future__ import annotations

import torch

from distill.data.types import ArrayDataset
from distill.errors import DistillError


def split_validation(ds: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``ds`` into ``(train, val)`` with ``round(fraction * n_c)`` samples of each class ``c`` in val.

    Stratified by ``ds.targets`` and deterministic in ``seed``; both parts keep the original
    sample order. Raises :class:`DistillError` when ``fraction`` is not in (0, 1) or a part would
    be empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DistillError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    targets = ds.targets.long()
    n = len(targets)
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = torch.randperm(n, generator=generator)
    # a stable sort by class keeps the random order within each class
    order = shuffled[torch.sort(targets[shuffled], stable=True).indices]
    _, counts = torch.unique(targets, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - torch.repeat_interleave(starts, counts)  # position within its class
    n_val = torch.round(counts.double() * fraction).long()
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[order] = rank < torch.repeat_interleave(n_val, counts)
    val_idx = torch.nonzero(is_val).flatten()
    train_idx = torch.nonzero(~is_val).flatten()
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DistillError(
            f"a validation fraction of {fraction} of {n} samples leaves an empty "
            f"{'validation' if len(val_idx) == 0 else 'training'} split; change data.val_fraction"
        )
    return ds.subset(train_idx), ds.subset(val_idx)


def training_subset(ds, size: int | None, seed: int, *, keep_order: bool = False):
    """``size`` samples of ``ds`` drawn at random (``data.train_subset``; seeded by ``seed``), or
    ``ds`` itself when ``size`` is ``None`` or not smaller. ``keep_order`` keeps the drawn samples
    in their original order (e.g. consecutive text blocks). ``ds`` is any data set with ``subset``."""
    if size is None or size >= len(ds):
        return ds
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 7919))[:size]
    return ds.subset(index.sort().values if keep_order else index)


def random_split(ds, fraction: float, seed: int, what: str = "samples"):
    """``(train, val)`` with ``round(fraction * n)`` random samples (at least one) in val, for data
    without class labels to stratify by (sentences, text blocks); both parts keep the original order."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(ds)))
    if n_val >= len(ds):
        raise DistillError(f"data.val_fraction {fraction} leaves no training {what}")
    return ds.subset(order[n_val:].sort().values), ds.subset(order[:n_val].sort().values)
