"""Image trees on disk: ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``), as a folder or a tar.

Decoding is shared by the ``image-folder`` and ``cifar10`` builders. A tar archive is read member by
member straight from the archive: nothing is written to disk, so no member name can escape the
data directory. The decoded arrays are cached as an ``.npz`` (loaded with ``allow_pickle=False``)
keyed by the files' names, sizes and times, so the second load takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.data.arrays import channel_stats
from distill.data.registry import register_builder
from distill.data.download import publish_file
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

log = logging.getLogger("distill.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_TEST_DIRS = ("test", "val")
_CACHE_VERSION = 1
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


@dataclass
class ImageTree:
    """Decoded image splits: ``*_x`` uint8 ``[N, C, H, W]``, ``*_y`` int64 ``[N]``."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    test_dir: str


def is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def _size_option(size: int | list[int] | tuple[int, int] | None) -> tuple[int, int] | None:
    """``size`` as ``(height, width)``."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return (int(size[0]), int(size[1]))
    raise DistillError(f"size must be a positive integer or [height, width], got {size!r}")


def _mode_option(mode: str) -> str | None:
    """Pillow mode for ``mode`` (``auto`` -> ``None``: grey if every image is grey, else RGB)."""
    modes = {"auto": None, "rgb": "RGB", "grey": "L", "gray": "L"}
    if not isinstance(mode, str) or mode.lower() not in modes:
        raise DistillError(f"mode must be one of auto, rgb, grey; got {mode!r}")
    return modes[mode.lower()]


def decode_image(source, where: str, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image file (path or file object) to uint8 ``[H, W, C]``.

    ``mode`` is ``"RGB"``, ``"L"`` or ``None`` (grey stays grey, everything else becomes RGB);
    ``size`` ``(H, W)`` resizes with bilinear filtering.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            target = mode or ("L" if image.mode in _GREY_MODES else "RGB")
            converted = image if image.mode == target else image.convert(target)
            if size is not None and converted.size != (size[1], size[0]):
                converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DistillError(f"cannot decode image {where}: {error}; delete or replace the file") from None
    return array[:, :, None] if array.ndim == 2 else array


def _stack(images: list[np.ndarray], channels: int, where: str) -> np.ndarray:
    """``[H, W, C]`` images -> ``[N, C, H, W]``; all must share one size.

    Grey images among colour ones (``mode="auto"``) get their channel repeated to ``channels``,
    which is what Pillow's conversion to RGB does.
    """
    images = [np.repeat(im, channels, axis=2) if im.shape[2] != channels else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        (h1, w1, _), (h2, w2, _) = sorted(shapes)[:2]
        raise DistillError(
            f"images in {where} differ in size ({h1}x{w1} and {h2}x{w2}); pass size: [height, width] to resize them"
        )
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def _assemble(records: dict[str, list[tuple[str, str, np.ndarray]]], test_dir: str, where: str) -> ImageTree:
    """Decoded ``{split: [(class, name, image [H, W, C])]}`` -> an :class:`ImageTree`.

    Samples are ordered by class then name; class indices follow train's sorted class names.
    """
    classes = sorted({c for c, _, _ in records["train"]})
    if not classes:
        raise DistillError(f"{where} holds no training images in class folders (train/<class>/<image>)")
    if not records[test_dir]:
        raise DistillError(f"{where} holds no images in {test_dir}/")
    channels = max(im.shape[2] for split in ("train", test_dir) for _, _, im in records[split])
    out = []
    for split in ("train", test_dir):
        rows = sorted(records[split], key=lambda r: (r[0], r[1]))
        entries = [(c, b) for c, b, _ in rows]
        place = f"{where}/{split}"
        out += [_stack([r[2] for r in rows], channels, place), _labels(entries, classes, place)]
    return ImageTree(*out, classes=classes, test_dir=test_dir)


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_SUFFIXES


def _folder_root(path: Path) -> Path:
    """The folder holding ``train/``: ``path`` itself or its only subfolder."""
    if (path / "train").is_dir():
        return path
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    raise DistillError(f"{path} has no train/ folder; expected train/<class>/<image> and test/<class>/<image>")


def _list_folder(root: Path) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """``{split: [(class, relative path)]}`` sorted, and the name of the test folder."""
    test_dir = next((d for d in _TEST_DIRS if (root / d).is_dir()), None)
    if test_dir is None:
        raise DistillError(f"{root} has train/ but no test/ or val/ folder; add one (a validation split of "
                           "train alone can be made with data.val_fraction)")
    listing = {}
    for split in ("train", test_dir):
        entries = []
        with os.scandir(root / split) as classes:
            for cls in sorted((c for c in classes if c.is_dir() and not c.name.startswith(".")), key=lambda c: c.name):
                with os.scandir(cls.path) as files:
                    names = sorted(f.name for f in files if f.is_file() and _is_image(f.name))
                entries += [(cls.name, f"{split}/{cls.name}/{n}") for n in names]
        listing[split] = entries
    return listing, test_dir


def _fingerprint(parts: list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:20]


def _load_cache(path: Path) -> ImageTree | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return ImageTree(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                             [str(c) for c in z["classes"].tolist()], str(z["test_dir"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error):
        log.warning("ignoring unreadable cache %s; decoding again", path)
        return None


def _save_cache(path: Path, tree: ImageTree) -> None:
    """Write the cache atomically; a read-only data directory only costs the speed-up."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        log.warning("cannot cache decoded images in %s (%s)", path.parent, error)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=tree.train_x, train_y=tree.train_y, test_x=tree.test_x, test_y=tree.test_y,
                     classes=np.array(tree.classes, dtype=str), test_dir=np.array(tree.test_dir))
        publish_file(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        log.warning("cannot cache decoded images in %s (%s)", path, error)


def _labels(entries: list[tuple[str, str]], classes: list[str], where: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _ in entries if c not in index})
    if unknown:
        raise DistillError(f"{where} has classes not in train/: {', '.join(unknown)}")
    return np.array([index[c] for c, _ in entries], dtype=np.int64)


def _decode_folder(root: Path, mode: str | None, size: tuple[int, int] | None,
                   listing: dict[str, list[tuple[str, str]]], test_dir: str) -> ImageTree:
    records = {
        split: [(cls, rel, decode_image(root / rel, str(root / rel), mode, size)) for cls, rel in entries]
        for split, entries in listing.items()
    }
    return _assemble(records, test_dir, str(root))


def _split_member(name: str) -> tuple[str, str, str, str] | None:
    """``prefix/split/class/file`` -> ``(prefix, split, class, file)`` for image members."""
    parts = name.split("/")
    if len(parts) < 3 or not _is_image(name):
        return None
    prefix, split, cls, base = "/".join(parts[:-3]), parts[-3], parts[-2], parts[-1]
    return (prefix, split, cls, base) if split in ("train", *_TEST_DIRS) else None


def _decode_tar(archive: Path, mode: str | None, size: tuple[int, int] | None) -> ImageTree:
    records: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": [], "val": []}
    prefixes = set()
    try:
        with tarfile.open(archive, "r|*") as tar:  # streaming: one pass, much faster than seeking
            for member in tar:
                name = member.name
                if name.startswith("/") or ".." in name.split("/"):
                    raise DistillError(f"refusing {archive}: member '{name}' has an absolute or '..' path")
                if not member.isfile():
                    continue
                parsed = _split_member(name)
                if parsed is None:
                    continue
                prefix, split, cls, base = parsed
                prefixes.add(prefix)
                data = tar.extractfile(member).read()
                image = decode_image(io.BytesIO(data), f"{archive}:{name}", mode, size)
                records[split].append((cls, base, image))
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise DistillError(f"cannot read {archive} as a tar archive ({error}); is it truncated?") from None
    if len(prefixes) > 1:
        raise DistillError(f"{archive} holds several image trees ({', '.join(sorted(prefixes))}); keep one")
    test_dir = next((d for d in _TEST_DIRS if records[d]), None)
    if not records["train"] or test_dir is None:
        raise DistillError(
            f"{archive} must hold train/<class>/<image> and test/<class>/<image> (or val/); "
            f"found {len(records['train'])} train and {len(records['test']) + len(records['val'])} test images"
        )
    return _assemble(records, test_dir, str(archive))


def load_image_tree(
    path: str | Path,
    *,
    size: int | list[int] | tuple[int, int] | None = None,
    mode: str = "auto",
    cache_dir: Path | None = None,
) -> ImageTree:
    """Decode an image tree (a folder, or a tar archive of one) into uint8 arrays.

    The tree is ``train/<class>/<image>`` and ``test/<class>/<image>`` (or ``val/``), either at
    ``path`` or inside its only subfolder. Class indices follow the sorted names of train's class
    folders. The decoded arrays are cached in ``cache_dir`` (when given) under a key of the file
    names, sizes and modification times and the options.
    """
    path = Path(path).expanduser()
    hw, pil_mode = _size_option(size), _mode_option(mode)
    options = [f"v{_CACHE_VERSION}", f"size={hw}", f"mode={pil_mode}"]
    if is_tar(path) and path.is_file():
        stat = path.stat()
        key = _fingerprint([str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), *options])
        decode = lambda: _decode_tar(path, pil_mode, hw)  # noqa: E731
    elif path.is_dir():
        root = _folder_root(path)
        listing, test_dir = _list_folder(root)
        stats = []
        for split in listing.values():
            for _, rel in split:
                st = (root / rel).stat()
                stats.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        key = _fingerprint([str(root.resolve()), *options, *stats])
        decode = lambda: _decode_folder(root, pil_mode, hw, listing, test_dir)  # noqa: E731
    else:
        what = "is neither a folder nor a .tar/.tar.gz archive" if path.exists() else "does not exist"
        raise DistillError(f"image tree {path} {what}; give a folder with train/ and test/, or a .tar.gz of one")
    stem = path.name.split(".")[0] or "images"
    cache = cache_dir / f"{stem}-{key}.npz" if cache_dir is not None else None
    tree = _load_cache(cache) if cache is not None else None
    if tree is None:
        log.info("decoding images from %s (cached afterwards)", path)
        tree = decode()
        if cache is not None:
            _save_cache(cache, tree)
    return tree


def tree_splits(name: str, tree: ImageTree, source: Path, mean=None, std=None, class_names=None) -> DataSplits:
    """:class:`DataSplits` of a decoded tree; ``mean``/``std`` default to the training images' own."""
    train_x = torch.from_numpy(tree.train_x)
    if mean is None or std is None:
        mean, std = channel_stats(train_x)
    return DataSplits(
        name=name,
        train=ArrayDataset(train_x, torch.from_numpy(tree.train_y)),
        test=ArrayDataset(torch.from_numpy(tree.test_x), torch.from_numpy(tree.test_y)),
        num_classes=len(tree.classes),
        input_shape=tuple(tree.train_x.shape[1:]),
        mean=tuple(mean),
        std=tuple(std),
        class_names=class_names or list(tree.classes),
        extra={"source": str(source), "test_split": tree.test_dir},
    )


@register_builder("image-folder")
def image_folder(
    data_dir: Path,
    *,
    path: str | Path,
    size: int | list[int] | None = None,
    mode: str = "auto",
) -> DataSplits:
    """Images in class folders: ``path/train/<class>/*`` and ``path/test/<class>/*`` (or ``val/``).

    ``path`` may also be a ``.tar``/``.tar.gz`` of such a tree. Inputs are uint8 ``[N, C, H, W]``;
    all images must share a size unless ``size`` (``H`` or ``[H, W]``) resizes them. ``mode``:
    ``auto`` (grey if every image is grey, else RGB), ``rgb`` or ``grey``. ``mean``/``std`` are
    computed from the training images. Decoded arrays are cached under ``data_dir/image-folder/``.
    """
    tree = load_image_tree(path, size=size, mode=mode, cache_dir=data_dir / "image-folder")
    return tree_splits("image-folder", tree, Path(path))
