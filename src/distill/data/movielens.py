"""MovieLens 100K (Harper & Konstan 2015, "The MovieLens Datasets: History and Context") as
implicit feedback, split leave-one-out by time.

``u.data`` holds 100,000 ratings (user, item, rating 1-5, unix time; tab-separated) by 943 users
of 1,682 movies. Any rating is a positive. The archive comes from GroupLens; its licence allows
research use but no redistribution, so it is downloaded by each user and never shipped.

Two checksums guard the data: the SHA-256 of ``ml-100k.zip`` (GroupLens publishes only its MD5,
0e33842e24a9c977be4e0107933c0723, and its size, 4,924,029 bytes; the SHA-256 below is the one
many independent public projects record for that archive) and the SHA-256 of ``u.data`` itself,
which was recomputed here from a copy with the official counts. The second one lets a folder
holding only ``u.data`` (the ``path`` option) be verified too.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from distill.data.registry import register_builder
from distill.data.download import fetch_files
from distill.data.interactions import Interactions, leave_one_out
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

ML100K_ARCHIVE = "ml-100k.zip"
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
U_DATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
ML100K_MIRRORS = ["https://files.grouplens.org/datasets/movielens/"]
_MEMBER = "ml-100k/u.data"
# u.data is 1,979,173 bytes; a member claiming much more is not it (and could be a zip bomb)
_MAX_MEMBER_BYTES = 64 << 20


def parse_u_data(data: bytes, source: str = "u.data") -> np.ndarray:
    """``u.data`` bytes -> int64 ``[N, 4]``: user, item, rating, timestamp per row.

    Fields are separated by tabs (any whitespace is accepted); empty lines are skipped. A line
    without exactly four integers raises :class:`DistillError` naming it.
    """
    lines = data.split(b"\n")
    rows_fast = None
    if all(len(line.split()) in (0, 4) for line in lines):
        tokens = data.split()
        try:
            rows_fast = np.array(tokens, dtype=np.int64).reshape(-1, 4)
        except ValueError:
            rows_fast = None
    if rows_fast is not None:
        if len(rows_fast) == 0:
            raise DistillError(f"{source} holds no ratings")
        return rows_fast
    # slow path: find the first bad line and name it
    number = 0
    for line in lines:
        if not line.strip():
            continue
        number += 1
        fields = line.split()
        try:
            if len(fields) != 4:
                raise ValueError
            [int(f) for f in fields]
        except ValueError:
            text = line.decode("ascii", errors="replace")[:80]
            raise DistillError(
                f"{source}: line {number} is not 'user item rating timestamp' (four integers): {text!r}"
            ) from None
    raise DistillError(f"{source} holds no ratings")


def _read_member(archive: Path) -> bytes:
    """The bytes of ``u.data`` inside ``archive``, read without extracting anything to disk."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == _MEMBER or n.rsplit("/", 1)[-1] == "u.data"]
            if not names:
                raise DistillError(f"{archive} holds no u.data; is it the MovieLens 100K archive?")
            info = zf.getinfo(_MEMBER if _MEMBER in names else names[0])
            if info.file_size > _MAX_MEMBER_BYTES:
                raise DistillError(
                    f"{archive}: u.data claims {info.file_size} bytes, far more than MovieLens 100K's; refusing to read it"
                )
            return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DistillError(f"{archive} is not a readable zip archive ({error}); delete it and fetch it again") from None


def _local_u_data(path: Path) -> tuple[bytes, Path]:
    """``u.data`` from ``path``: the archive itself, or a folder holding ``u.data``,
    ``ml-100k/u.data`` or ``ml-100k.zip``."""
    if path.is_file():
        if path.suffix == ".zip":
            return _read_member(path), path
        return path.read_bytes(), path
    if path.is_dir():
        for candidate in (path / "u.data", path / "ml-100k" / "u.data"):
            if candidate.is_file():
                return candidate.read_bytes(), candidate
        if (path / ML100K_ARCHIVE).is_file():
            return _read_member(path / ML100K_ARCHIVE), path / ML100K_ARCHIVE
    raise DistillError(
        f"ml-100k: {path} holds no u.data; give a folder with u.data (or ml-100k/u.data, or ml-100k.zip) "
        "or the ml-100k.zip archive"
    )


def load_u_data(
    data_dir: Path,
    path: str | Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    verify: bool = True,
) -> tuple[np.ndarray, str]:
    """The rows of ``u.data`` (see :func:`parse_u_data`) and where they were read from.

    With ``path`` the file is read from there; otherwise from ``data_dir/ml-100k/ml-100k.zip``,
    downloaded first (``download``) from ``mirror`` (a base URL, tried first) then GroupLens,
    and verified by SHA-256 before it is used. ``verify`` also checks the SHA-256 of ``u.data``
    itself, so a local copy is refused when it is not the official file; turn it off to read your
    own data in the same format.
    """
    if path is not None:
        data, source = _local_u_data(Path(path).expanduser())
    else:
        folder = Path(data_dir) / "ml-100k"
        archive = folder / ML100K_ARCHIVE
        if download:
            mirrors = ([mirror] if mirror else []) + ML100K_MIRRORS
            # fetch_files keeps a copy that already verifies and replaces one that does not
            archive = fetch_files(mirrors, {ML100K_ARCHIVE: ML100K_SHA256}, folder)[ML100K_ARCHIVE]
        elif not archive.is_file():
            raise DistillError(f"ml-100k: {archive} is missing; pass download=True or give path=<folder with u.data>")
        data, source = _read_member(archive), archive
    if verify:
        actual = hashlib.sha256(data).hexdigest()
        if actual != U_DATA_SHA256:
            raise DistillError(
                f"ml-100k: {source} is not the official u.data (sha256 {actual}, expected {U_DATA_SHA256}); "
                "fetch a fresh copy, or pass verify=False to use a modified file on purpose"
            )
    return parse_u_data(data, str(source)), str(source)


def movielens_interactions(rows: np.ndarray, validation: bool = False) -> Interactions:
    """Leave-one-out :class:`Interactions` from ``u.data`` rows (every rating is a positive)."""
    return leave_one_out(rows[:, 0], rows[:, 1], rows[:, 3], validation=validation)


def interaction_splits(name: str, interactions: Interactions, source: str) -> DataSplits:
    """``interactions`` as :class:`DataSplits` that the data-set registry can hand out.

    The classification view: a sample is a user id (int64 ``[1]``) whose target is an item id,
    ``num_classes`` is the number of items. ``train`` holds the training history, ``test`` the
    held-out item of each user that has one, ``extra["validation"]`` the same for validation (or
    ``None``). The ranking task reads ``extra["interactions"]``, which holds everything else.
    """
    def held_out(items: torch.Tensor | None) -> ArrayDataset | None:
        if items is None:
            return None
        users = torch.nonzero(items >= 0).flatten()
        return ArrayDataset(users[:, None], items[users])

    return DataSplits(
        name=name,
        train=ArrayDataset(interactions.train_users[:, None], interactions.train_items),
        test=held_out(interactions.test_items),
        num_classes=interactions.num_items,
        input_shape=(1,),
        extra={
            "task": "ranking",
            "interactions": interactions,
            "validation": held_out(interactions.valid_items),
            "num_users": interactions.num_users,
            "num_items": interactions.num_items,
            "source": source,
        },
    )


@register_builder("ml-100k")
def ml_100k(
    data_dir: Path,
    *,
    path: str | Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    validation: bool = False,
    verify: bool = True,
) -> DataSplits:
    """MovieLens 100K as implicit feedback: 943 users, 1,682 items, leave-one-out by time.

    The archive lives in ``data_dir/ml-100k/`` and is downloaded there from ``mirror`` then
    GroupLens; ``path`` reads a local folder (or the archive) instead. ``validation`` also holds
    out each user's second-to-last interaction. ``verify=False`` accepts a ``u.data`` that is not
    the official one. See :class:`~distill.data.interactions.Interactions` for what
    ``extra["interactions"]`` holds.
    """
    rows, source = load_u_data(data_dir, path, download, mirror, verify)
    return interaction_splits("ml-100k", movielens_interactions(rows, validation), source)
