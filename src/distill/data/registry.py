"""Data sets by name.

A data set builder is ``fn(data_dir: pathlib.Path, **options) -> DataSplits``. ``data_dir`` is
where downloaded files are stored (``--data-dir`` or ``DISTILL_DATA``, default
``~/.cache/distill/data``); builders that generate data offline ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from distill.data.types import DataSplits
from distill.registry import Registry

DatasetBuilder = Callable[..., DataSplits]
DATASETS: Registry[DatasetBuilder] = Registry("data set")


def default_data_dir() -> Path:
    """``$DISTILL_DATA`` or ``~/.cache/distill/data``."""
    env = os.environ.get("DISTILL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill" / "data"


def load_dataset(name: str, data_dir: str | Path | None = None, **options) -> DataSplits:
    """Build the data set registered as ``name``."""
    builder = DATASETS.get(name)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    return builder(root, **options)
