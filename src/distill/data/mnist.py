"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017), from their official homes.

Each file is verified by the SHA-256 of its *uncompressed* IDX content, so a copy that was
re-compressed (different ``.gz`` bytes, same content) verifies too. The digests below were computed
from copies whose uncompressed MD5s equal the officially published ones (MNIST images
6bbc9ace898e44ae57da46a324031adb / 2646ac647ad5339dbf082846283269ea; Fashion-MNIST images
f4a8712d7a061bf5bd6d2ca38dc4d50a / 8181f5470baa50b63fa0f6fddb340f0a) and whose label ``.gz``
files have the official ``.gz`` MD5s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from distill.data.registry import register_builder
from distill.data.download import fetch_files
from distill.data.idx import parse_idx, read_idx_bytes
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

# name of the file on the mirrors -> SHA-256 of its uncompressed content
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# The original MNIST host has been unreliable for years; PyTorch's copy on S3 goes first.
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
FASHION_MNIST_MIRRORS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_SETS = {
    "mnist": dict(
        files=MNIST_FILES, mirrors=MNIST_MIRRORS, mean=(0.1307,), std=(0.3081,),
        classes=[str(d) for d in range(10)],
    ),
    "fashion-mnist": dict(
        files=FASHION_MNIST_FILES, mirrors=FASHION_MNIST_MIRRORS, mean=(0.2860,), std=(0.3530,),
        classes=FASHION_MNIST_CLASSES,
    ),
}


def _find(folder: Path, name: str) -> Path | None:
    """``name`` (``.gz``) or its uncompressed twin in ``folder``."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path: Path, sha256: str) -> bytes | None:
    """The uncompressed IDX bytes of ``path``, or ``None`` when their SHA-256 is not ``sha256``."""
    data = read_idx_bytes(path)
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def load_idx_set(
    name: str, data_dir: Path, path: str | Path | None, download: bool, mirror: str | None
) -> DataSplits:
    """Build MNIST-like ``name`` from four verified IDX files (see :func:`mnist`)."""
    spec = _SETS[name]
    files: dict[str, str] = spec["files"]
    folder = Path(path).expanduser() if path is not None else data_dir / name
    if path is not None and not folder.is_dir():
        raise DistillError(f"{name}: path {folder} is not a directory holding the four IDX files")
    raw: dict[str, bytes] = {}
    for filename, sha256 in files.items():
        found = _find(folder, filename)
        data = _read_verified(found, sha256) if found is not None else None
        if data is None and path is None and download:
            mirrors = ([mirror] if mirror else []) + spec["mirrors"]
            if found is not None and found.suffix != ".gz":
                found.unlink()  # a stale uncompressed copy; the download lands beside it as .gz
            fetched = fetch_files(mirrors, {filename: sha256}, folder, gunzip=True)[filename]
            data = _read_verified(fetched, sha256)
        if data is None:
            if found is None:
                how = "pass download=True" if path is None else "check the path"
                raise DistillError(f"{name}: {filename} is missing from {folder}; {how}")
            raise DistillError(
                f"{name}: the content of {found} differs from the official file (sha256 of the uncompressed "
                f"bytes should be {sha256}); delete it"
                + (" and load again to download it" if path is None else " and fetch a fresh copy")
            )
        raw[filename] = data
    arrays = {k.split("-idx")[0]: parse_idx(v, str(folder / k)) for k, v in raw.items()}
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = arrays[f"{prefix}-images"], arrays[f"{prefix}-labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise DistillError(
                f"{name}: {prefix} files in {folder} have unexpected shapes {images.shape}, {labels.shape}"
            )
        splits.append(ArrayDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()))
    return DataSplits(
        name=name,
        train=splits[0],
        test=splits[1],
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=spec["mean"],
        std=spec["std"],
        class_names=list(spec["classes"]),
        extra={"source": str(folder)},
    )


@register_builder("mnist")
def mnist(
    data_dir: Path, *, path: str | Path | None = None, download: bool = True, mirror: str | None = None
) -> DataSplits:
    """MNIST: 60,000 train / 10,000 test handwritten digits, uint8 ``[N, 1, 28, 28]``, 10 classes.

    Files live in ``data_dir/mnist/`` and are downloaded there (``download=True``) from ``mirror``
    (a base URL, tried first) then the official mirrors. ``path`` reads a folder that already holds
    the four IDX files (``.gz`` or uncompressed) instead; nothing is downloaded then.
    """
    return load_idx_set("mnist", data_dir, path, download, mirror)


@register_builder("fashion-mnist")
def fashion_mnist(
    data_dir: Path, *, path: str | Path | None = None, download: bool = True, mirror: str | None = None
) -> DataSplits:
    """Fashion-MNIST: 60,000 / 10,000 clothing images, uint8 ``[N, 1, 28, 28]``, 10 classes.

    Options as for ``mnist``; files live in ``data_dir/fashion-mnist/``.
    """
    return load_idx_set("fashion-mnist", data_dir, path, download, mirror)
