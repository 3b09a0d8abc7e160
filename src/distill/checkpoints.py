"""Atomic, safe checkpoint files.

Written to a temporary file in the same directory, flushed and fsynced, then renamed over the
target: a crash leaves either the old file or the new one, never half of one. Read with
``torch.load(weights_only=True)``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temp file, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Save a training state (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holds objects we refuse to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"checkpoint {path} cannot be read safely ({first})") from None
    if not isinstance(state, dict):
        raise DistillError(f"checkpoint {path} does not hold a training state")
    return state
