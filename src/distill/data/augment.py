"""Batch augmentations as pure tensor functions (no torchvision), vectorised over the batch.

Random draws come from an explicit ``torch.Generator`` (on the CPU) so that a batch's augmentation
is reproducible from a seed; the results are moved to the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError


def crop_flip_params(
    batch_size: int, generator: torch.Generator, padding: int, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random offsets and flips for :func:`apply_crop_flip`.

    Returns ``(dy, dx, flipped)``, each ``[batch_size]``: crop offsets in ``[0, 2 * padding]`` and
    whether each sample is mirrored. The same draws are made whatever ``padding`` and ``flip`` are,
    so a generator's stream does not depend on the augmentation settings.
    """
    dy = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    flipped = torch.rand(batch_size, generator=generator) < 0.5
    return dy, dx, flipped & flip


def apply_crop_flip(
    x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor], padding: int
) -> torch.Tensor:
    """Zero-pad ``x`` ``[B, C, H, W]`` by ``padding``, crop each sample back to ``H x W`` at its
    offsets and mirror the flipped ones (left-right); returns ``[B, C, H, W]``."""
    b, c, h, w = x.shape
    dy, dx, flipped = (p.to(x.device) for p in params)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample.

    ``x``: float ``[B, C, H, W]``. Each sample is padded by ``padding`` pixels of zeros, cropped
    back to ``H x W`` at a random offset and, if ``flip``, mirrored with probability 1/2.
    Returns ``[B, C, H, W]``.
    """
    if x.dim() != 4:
        raise DistillError(f"crop and flip need images [B, C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise DistillError(f"crop padding must be >= 0, got {padding}")
    return apply_crop_flip(x, crop_flip_params(len(x), generator, padding, flip), padding)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dim 1) of ``x`` ``[B, C, ...]``; one value applies to all."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - m) / s


def mixup_inputs(x: torch.Tensor, generator: torch.Generator, alpha: float) -> torch.Tensor:
    """Mixup of inputs only: ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)`` per sample.

    For "function matching" (Beyer et al. 2022), where the teacher labels each mixed input, so no
    labels are mixed. ``x``: float ``[B, ...]``; returns the same shape. ``perm`` is a random
    permutation of the batch.
    """
    if not alpha > 0:
        raise DistillError(f"mixup alpha must be > 0, got {alpha}")
    if not x.dtype.is_floating_point:
        raise DistillError(f"mixup needs floating point inputs, got {x.dtype}")
    b = len(x)
    perm = torch.randperm(b, generator=generator)
    # torch's Beta sampler takes no generator; a numpy generator seeded from ours keeps it reproducible
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=b)
    lam = torch.as_tensor(lam, dtype=x.dtype).to(x.device).reshape((b,) + (1,) * (x.dim() - 1))
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each 1-D signal by a random ``-max_shift..max_shift`` steps, repeating the edge value.

    ``x``: ``[B, L]`` or ``[B, C, L]`` (the last dimension is time); returns the same shape. The
    usual augmentation for MNIST-1D-like sequences.
    """
    if max_shift <= 0:
        return x
    length = x.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=generator).to(x.device)
    positions = torch.arange(length, device=x.device)[None, :] - shifts[:, None]  # [B, L]
    positions = positions.clamp_(0, length - 1)
    if x.dim() == 3:
        positions = positions[:, None, :].expand(-1, x.shape[1], -1)
    return x.gather(-1, positions)
