"""CIFAR-10 (Krizhevsky 2009): the official binary archive, or an image tree of the same set.

Only the *binary* version is read: fixed-size records of one label byte and 3,072 pixel bytes
(1,024 red, 1,024 green, 1,024 blue, row-major). The python version is a pickle, and a
downloaded pickle is never loaded.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from distill.data.registry import register_builder
from distill.data.download import fetch_files, safe_extract_tar, sha256_of
from distill.data.image_folder import is_tar, load_image_tree, tree_splits
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
# SHA-256 of cifar-10-binary.tar.gz (170,052,171 bytes). The dataset page publishes only its MD5,
# c32a1d4ab5d03f1284b67883e8d87530; this SHA-256 is the one several independent public projects
# (e.g. Julia's MLDatasets, GoMLX) record for the same archive, found with a code search. It could
# not be recomputed here (no internet), so a download failing this check with the right size and
# MD5 would point at this constant rather than at the file.
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RECORD = 1 + 3 * 32 * 32
_BATCH_DIR = "cifar-10-batches-bin"
_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
_TEST_FILE = "test_batch.bin"
_BIN_FILES = [*_TRAIN_FILES, _TEST_FILE]


def parse_cifar_records(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Binary CIFAR-10 records -> images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]``."""
    if len(data) == 0 or len(data) % _RECORD:
        raise DistillError(
            f"{source} is not a CIFAR-10 binary batch: {len(data)} bytes is not a multiple of the "
            f"{_RECORD}-byte record; the file is truncated or of another format"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DistillError(f"{source} has label {labels.max()} > 9; it is not a CIFAR-10 binary batch")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _splits(parts: dict[str, bytes], source: Path) -> DataSplits:
    train = [parse_cifar_records(parts[f], f"{source}:{f}") for f in _TRAIN_FILES]
    test_x, test_y = parse_cifar_records(parts[_TEST_FILE], f"{source}:{_TEST_FILE}")
    return DataSplits(
        name="cifar10",
        train=ArrayDataset(torch.from_numpy(np.concatenate([x for x, _ in train])),
                           torch.from_numpy(np.concatenate([y for _, y in train]))),
        test=ArrayDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)),
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        class_names=list(CIFAR10_CLASSES),
        extra={"source": str(source)},
    )


def _bin_folder(path: Path) -> Path | None:
    """The folder holding the six ``.bin`` batches: ``path`` or ``path/cifar-10-batches-bin``."""
    for folder in (path, path / _BATCH_DIR):
        if all((folder / f).is_file() for f in _BIN_FILES):
            return folder
    return None


def _read_bin_folder(folder: Path) -> DataSplits:
    try:
        parts = {f: (folder / f).read_bytes() for f in _BIN_FILES}
    except OSError as error:
        raise DistillError(f"cannot read CIFAR-10 batches in {folder}: {error}") from None
    return _splits(parts, folder)


def _is_binary_archive(archive: Path) -> bool:
    """Whether ``archive`` holds CIFAR ``.bin`` batches (else it should be an image tree).

    Only the members up to the first data file are read, so an image archive is not scanned twice.
    """
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = member.name.lower()
                if member.isfile() and name.endswith(".bin"):
                    return True
                if member.isfile() and name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "bmp", "gif", "webp"):
                    return False
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise DistillError(f"cannot read {archive} as a tar archive ({error}); is it truncated?") from None
    return False


def _read_binary_archive(archive: Path) -> DataSplits:
    """Read the batches straight from the archive (nothing is extracted)."""
    try:
        with tarfile.open(archive, "r|*") as tar:  # streaming: one pass, no seeking
            parts = {}
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in _BIN_FILES:
                    parts[base] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise DistillError(f"cannot read {archive} ({error}); is it truncated?") from None
    missing = [f for f in _BIN_FILES if f not in parts]
    if missing:
        raise DistillError(f"{archive} lacks the CIFAR-10 batches {', '.join(missing)}")
    return _splits(parts, archive)


def _from_path(path: Path, data_dir: Path) -> DataSplits:
    if path.is_dir() and (found := _bin_folder(path)) is not None:
        return _read_bin_folder(found)
    if path.is_file() and is_tar(path) and _is_binary_archive(path):
        return _read_binary_archive(path)
    tree = load_image_tree(path, cache_dir=data_dir / "cifar10")
    if tree.classes != CIFAR10_CLASSES or tree.train_x.shape[1:] != (3, 32, 32):
        raise DistillError(
            f"{path} is not CIFAR-10: classes {', '.join(tree.classes)} with images "
            f"{'x'.join(map(str, tree.train_x.shape[1:]))}; CIFAR-10 has {', '.join(CIFAR10_CLASSES)} at 3x32x32. "
            "Use the image-folder data set for other image trees"
        )
    return tree_splits("cifar10", tree, path, CIFAR10_MEAN, CIFAR10_STD, list(CIFAR10_CLASSES))


@register_builder("cifar10")
def cifar10(
    data_dir: Path, *, path: str | Path | None = None, download: bool = True, mirror: str | None = None
) -> DataSplits:
    """CIFAR-10: 50,000 train / 10,000 test colour images, uint8 ``[N, 3, 32, 32]``, 10 classes.

    Without ``path``: the official binary archive is downloaded to ``data_dir/cifar10/`` (from
    ``mirror``, a base URL tried first, then the official site), verified, and its batches are
    extracted beside it once. ``path`` reads a local copy instead: the binary archive or its
    ``cifar-10-batches-bin`` folder, or an image tree ``{train,test}/<class>/<image>`` (a folder or
    a ``.tar.gz`` of one, decoded once and cached as ``.npz`` in ``data_dir/cifar10/``).
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise DistillError(f"cifar10: path {path} does not exist")
        return _from_path(path, data_dir)
    folder = data_dir / "cifar10"
    extracted = folder / "cifar-10-binary"
    if (found := _bin_folder(extracted)) is not None:
        return _read_bin_folder(found)
    archive = folder / CIFAR10_ARCHIVE
    if download:
        fetch_files(([mirror] if mirror else []) + [CIFAR10_URL], {CIFAR10_ARCHIVE: CIFAR10_SHA256}, folder)
    elif not archive.is_file():
        raise DistillError(f"cifar10: {archive} is missing; pass download=True or path=<a local copy>")
    elif (actual := sha256_of(archive)) != CIFAR10_SHA256:
        raise DistillError(
            f"cifar10: {archive} has sha256 {actual}, expected {CIFAR10_SHA256}; delete it and download again"
        )
    if extracted.exists():
        raise DistillError(f"cifar10: {extracted} is incomplete; delete it and load again")
    safe_extract_tar(archive, extracted)
    if (found := _bin_folder(extracted)) is None:
        raise DistillError(f"cifar10: {archive} does not hold the CIFAR-10 binary batches; delete it and load again")
    return _read_bin_folder(found)
