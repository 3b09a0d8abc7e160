"""A user's own arrays as a data set, plus the checks every builder shares.

``arrays``: ``path`` to a ``.npz`` with ``x_train, y_train, x_test, y_test`` (read with
``allow_pickle=False``) or a ``.pt`` / ``.pth`` dict of those tensors (read with
``torch.load(weights_only=True)``): neither format can run code while loading.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from distill.data.registry import register_builder
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

_KEYS = ("x_train", "y_train", "x_test", "y_test")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``images`` ``[N, C, H, W]`` (uint8 scaled to [0, 1], or float)."""
    means, stds = [], []
    levels = torch.arange(256, dtype=torch.float64) / 255
    for c in range(images.shape[1]):
        channel = images[:, c].reshape(-1)
        if images.dtype == torch.uint8:  # exact, via a histogram: no float copy of the data set
            counts = torch.bincount(channel, minlength=256).double()
            mean = (counts * levels).sum() / counts.sum()
            var = (counts * (levels - mean) ** 2).sum() / counts.sum()
        else:
            channel = channel.double()
            mean, var = channel.mean(), channel.var(correction=0)
        means.append(round(float(mean), 4))
        stds.append(round(max(float(var) ** 0.5, 1e-4), 4))
    return tuple(means), tuple(stds)


def check_targets(targets: torch.Tensor, where: str, num_classes: int | None = None) -> torch.Tensor:
    """``targets`` as ``[N]`` int64, checked to be class indices in ``[0, num_classes)``."""
    if targets.dim() != 1:
        raise DistillError(f"{where}: targets must be a 1-D array of class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        if targets.dtype.is_floating_point and bool((targets == targets.round()).all()):
            targets = targets.long()
        else:
            raise DistillError(f"{where}: targets must be integer class indices, got {targets.dtype}")
    targets = targets.long()
    if len(targets) and int(targets.min()) < 0:
        raise DistillError(f"{where}: targets must be >= 0, found {int(targets.min())}")
    if num_classes is not None and len(targets) and int(targets.max()) >= num_classes:
        raise DistillError(
            f"{where}: target {int(targets.max())} is out of range for num_classes={num_classes}; "
            "raise num_classes or fix the labels"
        )
    return targets


def _load_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _KEYS if k not in archive.files]
            if missing:
                raise DistillError(
                    f"{path} lacks {', '.join(missing)}; save it with "
                    "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            arrays = {k: archive[k] for k in archive.files if k in _KEYS or k == "class_names"}
    except DistillError:
        raise
    except ValueError as error:
        if "pickle" in str(error):
            raise DistillError(
                f"{path} holds object arrays, which would need pickle to load; save plain numeric arrays"
            ) from None
        raise DistillError(f"{path} is not a readable .npz file ({error})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DistillError(f"{path} is not a readable .npz file ({error}); is it truncated?") from None
    out: dict[str, torch.Tensor] = {}
    for key, value in arrays.items():
        if key == "class_names":
            out[key] = [str(v) for v in value.tolist()]
            continue
        if value.dtype.kind not in "biuf":
            raise DistillError(f"{path}: '{key}' has dtype {value.dtype}; use numbers (uint8 images or floats)")
        if value.dtype == np.uint16 or value.dtype == np.uint32 or value.dtype == np.uint64:
            value = value.astype(np.int64)
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise DistillError(
            f"cannot load {path} with torch.load(weights_only=True): {error}. It must be a dict of "
            "tensors saved with torch.save({'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...})"
        ) from None
    if not isinstance(obj, dict):
        raise DistillError(f"{path} holds a {type(obj).__name__}; expected a dict with keys {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise DistillError(f"{path} lacks {', '.join(missing)}; found keys {', '.join(map(str, obj))}")
    out = {}
    for key in _KEYS:
        if not isinstance(obj[key], torch.Tensor):
            raise DistillError(f"{path}: '{key}' is a {type(obj[key]).__name__}, expected a tensor")
        out[key] = obj[key]
    if "class_names" in obj:
        out["class_names"] = [str(c) for c in obj["class_names"]]
    return out


def _inputs(x: torch.Tensor, where: str, layout: str) -> torch.Tensor:
    if x.dim() < 2:
        raise DistillError(f"{where}: inputs must be [N, ...] with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.dim() == 3:  # grey images [N, H, W]
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise DistillError(
                f"{where}: uint8 inputs are images and must be [N, C, H, W] or [N, H, W], got {tuple(x.shape)}"
            )
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            raise DistillError(
                f"{where}: images of shape {tuple(x.shape)} look channels-last; pass layout: NHWC "
                "or store them as [N, C, H, W]"
            )
        return x.contiguous()
    if x.dtype.is_floating_point:
        if layout == "NHWC":
            if x.dim() != 4:
                raise DistillError(f"{where}: layout NHWC needs 4-D inputs, got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
        x = x.float().contiguous()
        if not bool(torch.isfinite(x).all()):
            raise DistillError(f"{where}: inputs contain NaN or infinite values")
        return x
    raise DistillError(f"{where}: inputs must be uint8 images or floating point, got {x.dtype}")


@register_builder("arrays")
def arrays(
    data_dir: Path,
    *,
    path: str | Path,
    num_classes: int | None = None,
    layout: str = "NCHW",
) -> DataSplits:
    """Your own data: ``path`` to ``.npz`` or ``.pt``/``.pth`` holding x_train, y_train, x_test, y_test.

    Inputs: ``uint8`` images ``[N, C, H, W]`` (or ``[N, H, W]``; ``layout="NHWC"`` for
    channels-last) or floating point of any shape ``[N, ...]`` (stored as float32). Targets:
    ``[N]`` integer class indices. ``num_classes`` defaults to ``max(target) + 1``; an optional
    ``class_names`` entry names them. ``mean``/``std`` are computed from the training images for
    uint8 images and left unset for float inputs.
    """
    path = Path(path).expanduser()
    if layout not in ("NCHW", "NHWC"):
        raise DistillError(f"arrays: layout must be NCHW or NHWC, got '{layout}'")
    if not path.is_file():
        raise DistillError(f"arrays: file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        loaded = _load_npz(path)
    elif suffix in (".pt", ".pth"):
        loaded = _load_pt(path)
    else:
        raise DistillError(f"arrays: {path} must end in .npz, .pt or .pth")
    x_train = _inputs(loaded["x_train"], f"{path}: x_train", layout)
    x_test = _inputs(loaded["x_test"], f"{path}: x_test", layout)
    if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
        raise DistillError(
            f"{path}: x_train {tuple(x_train.shape[1:])} {x_train.dtype} and x_test "
            f"{tuple(x_test.shape[1:])} {x_test.dtype} must share sample shape and dtype"
        )
    y_train = check_targets(loaded["y_train"], f"{path}: y_train")
    y_test = check_targets(loaded["y_test"], f"{path}: y_test")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise DistillError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    if len(y_train) == 0:
        raise DistillError(f"{path}: the training split is empty")
    seen = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    if num_classes is None:
        num_classes = seen
    elif not isinstance(num_classes, int) or num_classes < 1:
        raise DistillError(f"arrays: num_classes must be a positive integer, got {num_classes!r}")
    check_targets(y_train, f"{path}: y_train", num_classes)
    check_targets(y_test, f"{path}: y_test", num_classes)
    class_names = loaded.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        raise DistillError(f"{path}: class_names has {len(class_names)} names but there are {num_classes} classes")
    mean = std = None
    if x_train.dtype == torch.uint8:
        mean, std = channel_stats(x_train)
    return DataSplits(
        name="arrays",
        train=ArrayDataset(x_train, y_train),
        test=ArrayDataset(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        mean=mean,
        std=std,
        class_names=class_names,
        extra={"source": str(path)},
    )
