"""The batch loader: in-memory tensors, deterministic shuffling and augmentation, any process count.

Determinism contract (it makes resume exact and makes N-process runs equal 1-process runs):

- epoch ``e``'s permutation comes from a generator seeded by ``(seed, e)`` only;
- global batch ``k`` is ``perm[k * B:(k + 1) * B]`` (``B`` = ``batch_size``, the *global* size),
  and rank ``r`` of ``world_size`` takes its ``[r::world_size]`` slice;
- augmentation for global batch ``k`` is drawn from a generator seeded by ``(seed, e, k)`` for the
  whole global batch and sliced the same way.

So the batches of every rank, interleaved, are exactly the single-process batch.

Replayed views (``views=K``; FKD, Shen & Xing 2022, "A Fast Knowledge Distillation Framework for
Visual Recognition"): each sample ``i`` has ``K`` fixed augmented versions. In epoch ``e`` it is shown
as view ``v``, a deterministic function of ``(seed, e, i)``, and view ``(i, v)`` is augmented with
draws from a counter-based generator keyed by ``(seed, i, v)`` only, independent of epoch, batch and
rank. The same ``(i, v)`` is therefore always the same input, so a teacher cache built once over
every view (:func:`distill.cache.build_cache`) replays exactly what the teacher saw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distill.data.augment import apply_crop_flip, crop_flip_params
from distill.data.types import ArrayDataset
from distill.errors import DistillError

_AUGMENT_KEYS = {"crop_padding": int, "flip": bool}


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``, the same on every platform and process."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_FIELD = np.uint64((1 << 20) - 1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a ``uint64`` array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def counter_hash(key: int, *counters: np.ndarray | int) -> np.ndarray:
    """64 random-looking bits per element, a pure function of ``key`` and the counters.

    A counter-based generator: element ``j`` depends on ``(key, counters[0][j], counters[1][j], ...)``
    only, so one vectorised call gives every sample the draws a generator seeded by its own counters
    would, whatever batch it sits in. Counters broadcast; returns ``uint64`` of their shape.
    """
    # at least 1-D: numpy warns on overflow of scalars, and wrapping is what we want
    arrays = [np.atleast_1d(np.asarray(c)).astype(np.uint64) for c in counters]
    h = np.full(np.broadcast_shapes(*(a.shape for a in arrays)), np.uint64(key & (2**64 - 1)), np.uint64)
    for a in arrays:
        h = _mix64(h ^ _mix64(a + _GOLDEN))
    return h


class BatchLoader:
    """Batches of an :class:`ArrayDataset` as ``{"input", "target", "index"}`` dicts.

    ``input``: float32 ``[b, ...]``; uint8 inputs are scaled to [0, 1], then augmented (images
    ``[b, C, H, W]`` only: ``augment={"crop_padding": int, "flip": bool}``), then normalised with
    ``mean``/``std`` per channel when given. ``target``: int64 ``[b]``; ``index``: int64 ``[b]``,
    the samples' positions in ``dataset``. ``b`` is ``batch_size / world_size`` (the last batch may
    be smaller unless ``drop_last``). ``rank`` and ``world_size`` may be set after construction
    (the trainer does so); ``batch_size`` must be divisible by ``world_size``.

    ``views=K`` replays ``K`` fixed augmented views per sample (see the module docstring); batches
    then also hold ``"view"``: int64 ``[b]``, and :meth:`view_inputs` gives any sample's view.
    ``views=None`` (the default) draws fresh augmentation every epoch.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
        views: int | None = None,
        view_seed: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistillError(f"batch size must be a positive integer, got {batch_size!r}")
        if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
            raise DistillError(f"views must be a positive integer (or None for fresh augmentation), got {views!r}")
        if (mean is None) != (std is None):
            raise DistillError("give both mean and std for normalisation, or neither")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.views = views
        # the crops and flips of view (i, v) come from view_seed: a fixed data seed lets runs with
        # other shuffling seeds replay the views a teacher cache was built on
        self.view_seed = self.seed if view_seed is None else int(view_seed)
        self.epoch = 0
        self._inputs = dataset.inputs
        self._targets = dataset.targets.long()
        self._mean = self._std = None
        if mean is not None and _is_token_ids(self._inputs):
            raise DistillError("mean/std normalise measurements; these inputs are integer token ids")
        if mean is not None:
            channels = self._inputs.shape[1] if self._inputs.dim() > 1 else 1
            if len(mean) not in (1, channels) or len(std) != len(mean):
                raise DistillError(
                    f"mean/std have {len(mean)}/{len(std)} values but the inputs have {channels} channels"
                )
            if any(s <= 0 for s in std):
                raise DistillError(f"std values must be > 0, got {tuple(std)}")
            self._mean = tuple(float(m) for m in mean)
            self._std = tuple(float(s) for s in std)
            shape = (1, -1) + (1,) * (self._inputs.dim() - 2)
            self._mean_t = torch.tensor(self._mean, dtype=torch.float32).reshape(shape)
            self._std_t = torch.tensor(self._std, dtype=torch.float32).reshape(shape)
        self.padding, self.flip = self._augment_options(augment)

    def _augment_options(self, augment: dict | None) -> tuple[int, bool]:
        augment = dict(augment or {})
        unknown = sorted(set(augment) - set(_AUGMENT_KEYS))
        if unknown:
            raise DistillError(f"unknown augmentation {', '.join(unknown)}; accepted: {', '.join(_AUGMENT_KEYS)}")
        padding, flip = augment.get("crop_padding", 0) or 0, bool(augment.get("flip", False))
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise DistillError(f"crop_padding must be an integer >= 0, got {padding!r}")
        if (padding or flip) and self._inputs.dim() != 4:
            raise DistillError(
                f"crop and flip augment images [N, C, H, W], but the inputs are {tuple(self._inputs.shape)}; "
                "turn the augmentation off for this data set"
            )
        return padding, flip

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order and augmentation (call before iterating)."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (before views): what a stage's memory bank (CRD) is sized by."""
        return len(self._targets)

    def __len__(self) -> int:
        """Number of batches per epoch (the same on every rank)."""
        n = len(self._targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _check_ranks(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistillError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.batch_size % self.world_size:
            raise DistillError(
                f"batch size {self.batch_size} is not divisible by the {self.world_size} processes; the batch "
                f"size is global, so choose a multiple of {self.world_size}"
            )

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The sample order of ``epoch`` (default: the current one), int64 ``[N]``."""
        n = len(self._targets)
        if not self.shuffle:
            return torch.arange(n)
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
        return torch.randperm(n, generator=generator)

    @property
    def augmenting(self) -> bool:
        """Whether inputs are cropped or flipped."""
        return self.padding > 0 or self.flip

    def epoch_views(self, index: torch.Tensor, epoch: int | None = None) -> torch.Tensor:
        """Which view each of the samples ``index`` is shown as in ``epoch`` (default: the current
        one): int64 ``[b]`` in ``[0, views)``, a function of ``(seed, epoch, index)`` only."""
        if self.views is None:
            raise DistillError("this loader draws fresh augmentation each epoch; build it with views=K to replay views")
        epoch = self.epoch if epoch is None else epoch
        bits = counter_hash(derive_seed("view", self.seed), epoch, index.cpu().numpy())
        return torch.from_numpy((bits % np.uint64(self.views)).astype(np.int64))

    def view_inputs(self, index: torch.Tensor, view: torch.Tensor | int) -> torch.Tensor:
        """The inputs of samples ``index`` (int64 ``[b]``) as views ``view`` (int64 ``[b]``, or one
        int for all): scaled, augmented with the draws of ``(seed, i, v)`` and normalised exactly as
        batches of a ``views`` loader are. Float32 ``[b, ...]``."""
        index = torch.as_tensor(index).cpu().long().reshape(-1)
        view = torch.as_tensor(view).cpu().long()
        view = view.expand(index.shape) if view.dim() == 0 else view.reshape(-1)
        if view.shape != index.shape:
            raise DistillError(f"view_inputs: {len(view)} views for {len(index)} samples")
        n = len(self._targets)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            raise DistillError(f"view_inputs: sample indices must be in [0, {n})")
        if len(view) and (int(view.min()) < 0 or (self.views is not None and int(view.max()) >= self.views)):
            raise DistillError(f"view_inputs: views must be in [0, {self.views}), the loader's views")
        x = _model_input(self._inputs[index])
        if self.augmenting:
            bits = counter_hash(derive_seed("replay", self.view_seed), index.numpy(), view.numpy())
            span = np.uint64(2 * self.padding + 1)
            dy = torch.from_numpy(((bits & _FIELD) % span).astype(np.int64))
            dx = torch.from_numpy((((bits >> np.uint64(20)) & _FIELD) % span).astype(np.int64))
            flipped = torch.from_numpy(((bits >> np.uint64(40)) & np.uint64(1)).astype(bool)) & self.flip
            x = apply_crop_flip(x, (dy, dx, flipped), self.padding)
        if self._mean is not None:
            x = (x - self._mean_t) / self._std_t
        return x

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._check_ranks()
        order = self.order()
        if self.views is not None:
            yield from self._iter_views(order)
            return
        augmenting = self.augmenting
        prepared = None if augmenting else self._prepared_inputs()
        for k in range(len(self)):
            global_index = order[k * self.batch_size:(k + 1) * self.batch_size]
            index = global_index[self.rank::self.world_size]
            if prepared is not None:
                yield {"input": prepared[index], "target": self._targets[index], "index": index}
                continue
            x = _model_input(self._inputs[index])
            if augmenting:
                generator = torch.Generator().manual_seed(derive_seed("augment", self.seed, self.epoch, k))
                params = crop_flip_params(len(global_index), generator, self.padding, self.flip)
                x = apply_crop_flip(x, tuple(p[self.rank::self.world_size] for p in params), self.padding)
            if self._mean is not None:
                x = (x - self._mean_t) / self._std_t
            yield {"input": x, "target": self._targets[index], "index": index}

    _PREPARE_LIMIT = 1 << 30  # bytes of float32 inputs worth holding to skip per-batch conversion

    def _prepared_inputs(self) -> torch.Tensor | None:
        """Without augmentation every epoch converts the same inputs: do it once (scaled and
        normalised float32), unless that would take more than a GiB."""
        if self._inputs.numel() * 4 > self._PREPARE_LIMIT:
            return None
        if getattr(self, "_prepared", None) is None:
            x = _model_input(self._inputs)  # a new tensor, or the caller's own (not changed in place)
            if self._mean is not None:
                x = x.sub(self._mean_t) if x is self._inputs else x.sub_(self._mean_t)
                x.div_(self._std_t)
            self._prepared = x.contiguous()
        return self._prepared

    def _iter_views(self, order: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        # every draw is per sample, so a rank's slice is the single-process batch's slice as it is
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size][self.rank::self.world_size]
            view = self.epoch_views(index)
            yield {"input": self.view_inputs(index, view), "target": self._targets[index], "index": index, "view": view}


def _is_token_ids(x: torch.Tensor) -> bool:
    return not x.is_floating_point() and x.dtype not in (torch.uint8, torch.bool)


def _model_input(x: torch.Tensor) -> torch.Tensor:
    """What a model gets: uint8 images scaled to [0, 1] (a new tensor), other integers (token ids)
    as they are, so a teacher run in bf16 or fp16 cannot round them, and measurements as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if _is_token_ids(x):
        return x
    return x.float()
