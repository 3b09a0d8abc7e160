"""Data sets made without a network: scikit-learn's digits and the MNIST-1D generator."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from distill.data.arrays import channel_stats
from distill.data.registry import register_builder
from distill.data.download import publish_file
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

log = logging.getLogger("distill.data")

_DIGIT_NAMES = [str(d) for d in range(10)]


def _fraction(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DistillError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def _int(value: int, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DistillError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_builder("digits")
def digits(data_dir: Path, *, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 handwritten digits: float32 ``[N, 1, 8, 8]`` in [0, 1], 10 classes.

    The test split is a stratified ``test_fraction`` of the samples chosen with ``seed``.
    ``mean``/``std`` are those of the training split. Needs scikit-learn; ``data_dir`` is unused.
    """
    test_fraction, seed = _fraction(test_fraction, "digits: test_fraction"), _int(seed, "digits: seed")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DistillError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    try:
        train_idx, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as error:  # too few samples per class for the fraction
        raise DistillError(f"digits: test_fraction={test_fraction} cannot be stratified: {error}") from None
    train_idx.sort()
    test_idx.sort()
    train_x = torch.from_numpy(images[train_idx])
    mean, std = channel_stats(train_x)
    return DataSplits(
        name="digits",
        train=ArrayDataset(train_x, torch.from_numpy(labels[train_idx])),
        test=ArrayDataset(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])),
        num_classes=10,
        input_shape=(1, 8, 8),
        mean=mean,
        std=std,
        class_names=list(_DIGIT_NAMES),
        extra={"test_fraction": test_fraction, "seed": seed},
    )


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DistillError("the mnist1d data set needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset seeds the global `random` and numpy generators; put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": data["x"].astype(np.float32), "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": data["x_test"].astype(np.float32), "y_test": np.asarray(data["y_test"], dtype=np.int64),
        "args": np.array(json.dumps({k: v for k, v in vars(args).items() if k != "url"}, sort_keys=True)),
    }


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


@register_builder("mnist1d")
def mnist1d(data_dir: Path, *, num_samples: int = 5000, seed: int = 42) -> DataSplits:
    """MNIST-1D (Greydanus 2020): ``num_samples`` length-40 signals, float32 ``[N, 40]``, 10 classes.

    Generated locally by the ``mnist1d`` package with its default arguments (80% train, 20% test;
    the package makes ``num_samples // 10`` samples per class). The defaults give the reference
    4,000 / 1,000 set. Inputs are already standardised by the generator, so ``mean``/``std`` are
    unset. The arrays are cached under ``data_dir/mnist1d/`` keyed by the options and the package
    version.
    """
    num_samples, seed = _int(num_samples, "mnist1d: num_samples", 10), _int(seed, "mnist1d: seed")
    key = hashlib.sha256(f"{num_samples}:{seed}:{_package_version('mnist1d')}".encode()).hexdigest()[:16]
    cache = data_dir / "mnist1d" / f"mnist1d-n{num_samples}-s{seed}-{key}.npz"
    arrays = None
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            log.warning("ignoring unreadable cache %s; generating again", cache)
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, seed)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                publish_file(tmp, cache)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:  # a read-only data directory only costs the speed-up
            log.warning("cannot cache mnist1d in %s (%s)", cache.parent, error)
    return DataSplits(
        name="mnist1d",
        train=ArrayDataset(torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])),
        test=ArrayDataset(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])),
        num_classes=10,
        input_shape=(int(arrays["x_train"].shape[1]),),
        class_names=list(_DIGIT_NAMES),
        extra={"num_samples": num_samples, "seed": seed},
    )
