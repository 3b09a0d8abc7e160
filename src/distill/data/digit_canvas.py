"""Detection data from MNIST: real digits pasted at several scales on larger canvases.

    data = load_dataset("mnist-detection", path="../shared/data/mnist", canvas_size=96)
    data.train            # DetectionSet: images uint8 [N, 1, 96, 96], boxes, labels, mask

Each canvas is black (0) and holds ``digits = (lo, hi)`` MNIST digits (a number drawn uniformly in
that range). A digit is cropped to its ink, resized (bilinear, antialiased) so that its longer side
is a whole number of pixels drawn uniformly in ``scale = (lo, hi)``, its faint edge (values below
``INK``) set to 0, and pasted (pixel-wise maximum) at a uniformly drawn position where its box
overlaps no earlier box with IoU above ``max_iou`` (a digit that finds no such place in 50 tries is
left out, so a canvas may hold fewer digits than drawn; the first always fits). Its box is the tight box of
its nonzero pixels, ``(x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive; its label is the digit.

Canvases of the train split use MNIST train digits, those of the test split MNIST test digits.
Canvas ``i`` of a split is a pure function of ``(seed, split, i)`` and the options: the same seed
gives identical canvases, and a larger ``train_images`` adds canvases after the same first ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.data.registry import register_builder
from distill.data.loader import derive_seed
from distill.data.registry import load_dataset
from distill.data.types import ArrayDataset, DataSplits, DetectionSet
from distill.errors import DistillError

INK = 16  # uint8 values below this, left by resampling at a digit's edge, are cleared
PLACEMENT_TRIES = 50


def _pair(name: str, value, low: int) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DistillError(f"{name} must be a pair [min, max] of integers, got {value!r}") from None
    if not low <= a <= b:
        raise DistillError(f"{name} must satisfy {low} <= min <= max, got [{a}, {b}]")
    return a, b


def _ink_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y1, x1, y2, x2)`` of the nonzero pixels of a 2-D array (exclusive ends), or None."""
    rows, cols = np.nonzero(image.any(1))[0], np.nonzero(image.any(0))[0]
    if not len(rows):
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _resized(digit: np.ndarray, longer: int) -> np.ndarray | None:
    """``digit`` (uint8 ``[h, w]``, cropped to its ink) resized so its longer side is ``longer``,
    faint edge cleared, cropped to its ink again; None if nothing is left."""
    h, w = digit.shape
    factor = longer / max(h, w)
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    x = torch.from_numpy(digit).float()[None, None]
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    patch = y[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    patch[patch < INK] = 0
    box = _ink_box(patch)
    return None if box is None else patch[box[0]:box[2], box[1]:box[3]]


def _iou(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    """The largest IoU of ``box`` with any of ``others`` (all ``(x1, y1, x2, y2)``)."""
    best = 0.0
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            union = (box[2] - box[0]) * (box[3] - box[1]) + (o[2] - o[0]) * (o[3] - o[1]) - inter
            best = max(best, inter / union)
    return best


def make_canvases(
    digits_images: torch.Tensor,
    digits_labels: torch.Tensor,
    count: int,
    *,
    canvas_size: int = 96,
    digits: tuple[int, int] = (1, 5),
    scale: tuple[int, int] = (14, 42),
    max_iou: float = 0.2,
    seed: int = 0,
    split: str = "train",
) -> DetectionSet:
    """``count`` canvases built from the source digits ``digits_images`` (uint8 ``[N, 1, h, w]`` or
    ``[N, h, w]``) and their classes ``digits_labels`` ``[N]`` (see the module docstring)."""
    lo, hi = _pair("digits", digits, 1)
    s_lo, s_hi = _pair("scale", scale, 2)
    if s_hi > canvas_size:
        raise DistillError(f"the largest digit scale {s_hi} does not fit a {canvas_size}-pixel canvas")
    if not 0 <= max_iou <= 1:
        raise DistillError(f"max_iou must be in [0, 1], got {max_iou}")
    if count < 1:
        raise DistillError(f"the number of images must be >= 1, got {count}")
    source = digits_images.reshape(len(digits_images), *digits_images.shape[-2:]).numpy()
    classes = digits_labels.long().numpy()
    images = np.zeros((count, 1, canvas_size, canvas_size), np.uint8)
    boxes = np.zeros((count, hi, 4), np.float32)
    labels = np.zeros((count, hi), np.int64)
    mask = np.zeros((count, hi), bool)
    crops: dict[int, np.ndarray] = {}
    for i in range(count):
        rng = np.random.default_rng(derive_seed("digit-canvas", seed, split, i))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(lo, hi + 1))):
            j = int(rng.integers(len(source)))
            longer = int(rng.integers(s_lo, s_hi + 1))
            if j not in crops:
                ink = _ink_box(source[j])
                crops[j] = source[j] if ink is None else source[j][ink[0]:ink[2], ink[1]:ink[3]]
            patch = _resized(crops[j], longer) if crops[j].any() else None
            if patch is None:  # a blank source image: nothing to paste
                continue
            ph, pw = patch.shape
            tries = zip(rng.integers(canvas_size - pw + 1, size=PLACEMENT_TRIES).tolist(),
                        rng.integers(canvas_size - ph + 1, size=PLACEMENT_TRIES).tolist())
            for x, y in tries:
                box = (x, y, x + pw, y + ph)
                if not placed or _iou(box, placed) <= max_iou:
                    region = images[i, 0, y:y + ph, x:x + pw]
                    np.maximum(region, patch, out=region)
                    boxes[i, len(placed)] = box
                    labels[i, len(placed)] = classes[j]
                    mask[i, len(placed)] = True
                    placed.append(box)
                    break
    return DetectionSet(torch.from_numpy(images), torch.from_numpy(boxes), torch.from_numpy(labels),
                        torch.from_numpy(mask))


@register_builder("mnist-detection")
def mnist_detection(
    data_dir: Path,
    *,
    path: str | Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    canvas_size: int = 96,
    train_images: int = 10000,
    test_images: int = 2000,
    digits: tuple[int, int] = (1, 5),
    scale: tuple[int, int] = (14, 42),
    max_iou: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """MNIST digits on ``canvas_size``-pixel canvases, with boxes (see the module docstring).

    ``path``/``download``/``mirror`` are passed to the ``mnist`` data set, whose train and test
    digits make the train and test canvases. ``train`` and ``test`` are
    :class:`~distill.data.types.DetectionSet` s (not :class:`ArrayDataset` s): feed them with
    :class:`distill.tasks.detection.DetectionLoader`. ``mean``/``std`` are those of the training
    canvases.
    """
    mnist = load_dataset("mnist", data_dir, path=path, download=download, mirror=mirror)
    options = dict(canvas_size=int(canvas_size), digits=digits, scale=scale, max_iou=float(max_iou), seed=int(seed))
    splits = {}
    for name, part, count in (("train", mnist.train, train_images), ("test", mnist.test, test_images)):
        assert isinstance(part, ArrayDataset)
        splits[name] = make_canvases(part.inputs, part.targets, int(count), split=name, **options)
    pixels = splits["train"].images.float().div(255)
    return DataSplits(
        name="mnist-detection",
        train=splits["train"],  # type: ignore[arg-type]  (a DetectionSet)
        test=splits["test"],  # type: ignore[arg-type]
        num_classes=10,
        input_shape=(1, int(canvas_size), int(canvas_size)),
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        class_names=[str(d) for d in range(10)],
        extra={"task": "detection", **options, "source": mnist.extra.get("source")},
    )
