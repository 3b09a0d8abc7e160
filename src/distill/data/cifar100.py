"""CIFAR-100 (Krizhevsky 2009): the official binary archive, fine (100) or coarse (20) labels.

Only the *binary* version is read: fixed-size records of a coarse-label byte, a fine-label byte
and 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, row-major), in ``train.bin`` (50,000
records) and ``test.bin`` (10,000). The class names are the lines of ``fine_label_names.txt`` and
``coarse_label_names.txt`` beside them. The python version is a pickle, and a downloaded pickle is
never loaded.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from distill.data.registry import register_builder
from distill.data.download import fetch_files, safe_extract_tar, sha256_of
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"
# SHA-256 of cifar-100-binary.tar.gz (168,513,733 bytes). The dataset page publishes only its MD5,
# 03b5dce01913d631647c71ecec9e9cb8; this SHA-256 is the one three independent public projects
# record for the same URL (Julia's MLDatasets, GoMLX's CIFAR loader and torchvision-ruby), found
# with a code search. It could not be recomputed here (no internet), so a download failing this
# check with the right size and MD5 would point at this constant rather than at the file.
CIFAR100_SHA256 = "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"
# Per-channel statistics of the training images, as used by the CRD benchmark (RepDistiller).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

LABELS = {"fine": (1, 100, "fine_label_names.txt"), "coarse": (0, 20, "coarse_label_names.txt")}
_RECORD = 2 + 3 * 32 * 32
_FOLDER = "cifar-100-binary"
_TRAIN_FILE, _TEST_FILE = "train.bin", "test.bin"
_MEMBERS = [_TRAIN_FILE, _TEST_FILE, *(names for _, _, names in LABELS.values())]


def parse_cifar100_records(data: bytes, source: str, labels: str = "fine") -> tuple[np.ndarray, np.ndarray]:
    """Binary CIFAR-100 records -> images uint8 ``[N, 3, 32, 32]`` and ``labels`` int64 ``[N]``.

    ``labels`` is ``"fine"`` (the second byte, 0-99) or ``"coarse"`` (the first byte, 0-19). Both
    label bytes are range-checked whichever is returned: a file of another format fails early.
    """
    if len(data) == 0 or len(data) % _RECORD:
        raise DistillError(
            f"{source} is not a CIFAR-100 binary file: {len(data)} bytes is not a multiple of the "
            f"{_RECORD}-byte record; the file is truncated or of another format"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    for name, (column, classes, _) in LABELS.items():
        if (top := int(records[:, column].max())) >= classes:
            raise DistillError(
                f"{source} has {name} label {top} > {classes - 1}; it is not a CIFAR-100 binary file"
            )
    column = LABELS[labels][0]
    images = records[:, 2:].reshape(-1, 3, 32, 32).copy()
    return images, records[:, column].astype(np.int64)


def _class_names(parts: dict[str, bytes], labels: str, source: Path) -> list[str] | None:
    """The names in ``*_label_names.txt`` (one per line, blank lines ignored), or None if absent."""
    _, classes, file = LABELS[labels]
    if file not in parts:
        return None
    names = [line.strip() for line in parts[file].decode("utf-8", errors="replace").splitlines() if line.strip()]
    if len(names) != classes:
        raise DistillError(
            f"{source}:{file} lists {len(names)} class names, expected {classes}; the file is damaged"
        )
    return names


def _splits(parts: dict[str, bytes], source: Path, labels: str) -> DataSplits:
    train_x, train_y = parse_cifar100_records(parts[_TRAIN_FILE], f"{source}:{_TRAIN_FILE}", labels)
    test_x, test_y = parse_cifar100_records(parts[_TEST_FILE], f"{source}:{_TEST_FILE}", labels)
    return DataSplits(
        name="cifar100",
        train=ArrayDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        test=ArrayDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)),
        num_classes=LABELS[labels][1],
        input_shape=(3, 32, 32),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        class_names=_class_names(parts, labels, source),
        extra={"source": str(source), "labels": labels},
    )


def _bin_folder(path: Path) -> Path | None:
    """The folder holding ``train.bin`` and ``test.bin``: ``path`` or ``path/cifar-100-binary``."""
    for folder in (path, path / _FOLDER):
        if (folder / _TRAIN_FILE).is_file() and (folder / _TEST_FILE).is_file():
            return folder
    return None


def _read_folder(folder: Path, labels: str) -> DataSplits:
    try:
        parts = {f: (folder / f).read_bytes() for f in _MEMBERS if (folder / f).is_file()}
    except OSError as error:
        raise DistillError(f"cannot read CIFAR-100 files in {folder}: {error}") from None
    return _splits(parts, folder, labels)


def _read_archive(archive: Path, labels: str) -> DataSplits:
    """Read the files straight from the archive (nothing is extracted)."""
    try:
        with tarfile.open(archive, "r|*") as tar:  # streaming: one pass, no seeking
            parts = {}
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in _MEMBERS:
                    parts[base] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise DistillError(f"cannot read {archive} as a tar archive ({error}); is it truncated?") from None
    missing = [f for f in (_TRAIN_FILE, _TEST_FILE) if f not in parts]
    if missing:
        raise DistillError(f"{archive} lacks the CIFAR-100 files {', '.join(missing)}; is it the binary version?")
    return _splits(parts, archive, labels)


@register_builder("cifar100")
def cifar100(
    data_dir: Path,
    *,
    path: str | Path | None = None,
    labels: str = "fine",
    download: bool = True,
    mirror: str | None = None,
) -> DataSplits:
    """CIFAR-100: 50,000 train / 10,000 test colour images, uint8 ``[N, 3, 32, 32]``.

    ``labels``: ``"fine"`` (100 classes, the usual benchmark) or ``"coarse"`` (20 superclasses).
    Without ``path``: the official binary archive is downloaded to ``data_dir/cifar100/`` (from
    ``mirror``, a base URL tried first, then the official site), verified by SHA-256, and extracted
    beside it once. ``path`` reads a local copy instead: ``cifar-100-binary.tar.gz`` (read without
    extracting) or its extracted ``cifar-100-binary`` folder (or the folder above it).
    """
    if labels not in LABELS:
        raise DistillError(f"cifar100: labels must be 'fine' or 'coarse', got {labels!r}")
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise DistillError(f"cifar100: path {path} does not exist")
        if path.is_dir():
            if (found := _bin_folder(path)) is None:
                raise DistillError(
                    f"cifar100: {path} holds no train.bin and test.bin (nor a {_FOLDER} folder with them); "
                    f"give the extracted binary version or {CIFAR100_ARCHIVE}"
                )
            return _read_folder(found, labels)
        return _read_archive(path, labels)
    folder = data_dir / "cifar100"
    extracted = folder / "extracted"
    if (found := _bin_folder(extracted)) is not None:
        return _read_folder(found, labels)
    archive = folder / CIFAR100_ARCHIVE
    if download:
        fetch_files(([mirror] if mirror else []) + [CIFAR100_URL], {CIFAR100_ARCHIVE: CIFAR100_SHA256}, folder)
    elif not archive.is_file():
        raise DistillError(f"cifar100: {archive} is missing; pass download=True or path=<a local copy>")
    elif (actual := sha256_of(archive)) != CIFAR100_SHA256:
        raise DistillError(
            f"cifar100: {archive} has sha256 {actual}, expected {CIFAR100_SHA256}; delete it and download again"
        )
    if extracted.exists():
        raise DistillError(f"cifar100: {extracted} is incomplete; delete it and load again")
    safe_extract_tar(archive, extracted)
    if (found := _bin_folder(extracted)) is None:
        raise DistillError(f"cifar100: {archive} does not hold the CIFAR-100 binary files; delete it and load again")
    return _read_folder(found, labels)
