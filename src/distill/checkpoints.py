"""Atomic, verified checkpoint files, and the fault points that prove them crash-safe.

A file is written to a temporary file in the same directory, flushed and fsynced, then renamed
over the target: a crash leaves either the old file or the new one, never half of one.

A checkpoint file is one header line and the ``torch.save`` payload::

    DISTILL-CHECKPOINT 2 <SHA-256 of the payload, hex> <payload length in bytes>\\n
    <payload>

:func:`load_checkpoint` checks the length and the SHA-256 before it unpickles anything, so a
truncated or altered file is a clear error, never a half-restored run. The payload is read with
``torch.load(weights_only=True)``, so a checkpoint cannot run code. Files without the header (from
distill before checksums) are still read, unverified.

Fault points (for tests): ``DISTILL_FAULT=POINT:ARGS`` makes the process kill itself with SIGKILL,
as a power cut or the OOM killer would, at one chosen place:

- ``checkpoint-write:N``: during the N-th checkpoint write of the process, with half of the
  payload in the temporary file;
- ``cache-write:N``: after the N-th batch written into a teacher cache being built;
- ``cache-install:N``: during the N-th replacement of an existing teacher cache, between moving
  the old one aside and moving the new one in;
- ``epoch-step:[NAME:]E:S``: after step S of epoch E (both 1-based) of the trainer called NAME
  (any trainer when NAME is left out). The training loop carries no fault point: this one fires
  only in processes whose trainers have the test suite's fault callback, which
  ``tests/fault_injection.py`` (``distill``'s command line with that callback added to every fit)
  installs; elsewhere it has no effect.

The variable is read once per process; when unset, a fault point costs one comparison.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError

MAGIC = b"DISTILL-CHECKPOINT"
VERSION = 2
_HEADER_MAX = 200  # bytes: the header line is about 110

FAULT_ENV = "DISTILL_FAULT"
_FAULT_POINTS = {
    "checkpoint-write": "checkpoint-write:N",
    "cache-write": "cache-write:N",
    "cache-install": "cache-install:N",
    "epoch-step": "epoch-step:[NAME:]E:S",
}
_fault: tuple[str, tuple[str, ...]] | None = None
_fault_read = False
_fault_counts: dict[str, int] = {}


# ------------------------------------------------------------------------------ fault points
def _read_fault() -> tuple[str, tuple[str, ...]] | None:
    global _fault, _fault_read
    if not _fault_read:
        text = os.environ.get(FAULT_ENV, "").strip()
        _fault, _fault_read = None, True
        if text:
            point, _, rest = text.partition(":")
            args = tuple(rest.split(":")) if rest else ()
            counted = point != "epoch-step"
            valid = point in _FAULT_POINTS and (
                (counted and len(args) == 1 and args[0].isdigit())
                or (not counted and len(args) in (2, 3) and all(a.isdigit() for a in args[-2:]))
            )
            if not valid:
                raise DistillError(
                    f"{FAULT_ENV}='{text}' is not a fault point; use one of "
                    + ", ".join(_FAULT_POINTS.values())
                )
            _fault = (point, tuple(a if not a.isdigit() else str(int(a)) for a in args))
    return _fault


def fault_armed(point: str) -> bool:
    """Whether ``DISTILL_FAULT`` names ``point`` (read once per process)."""
    fault = _read_fault() if not _fault_read else _fault
    return fault is not None and fault[0] == point


def fault_point(point: str, *where: Any) -> None:
    """Kill this process with SIGKILL if ``DISTILL_FAULT`` names this point and place.

    Counted points (no ``where``) fire on their N-th call in the process; placed points fire when
    the given arguments equal the last values of ``where`` (compared as strings).
    """
    if not fault_armed(point):
        return
    _, args = _fault
    if where:
        hit = tuple(str(w) for w in where)[-len(args):] == args
    else:
        _fault_counts[point] = _fault_counts.get(point, 0) + 1
        hit = args == (str(_fault_counts[point]),)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ atomic files
def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    fsync_dir(path.parent)
    return path


def replace_directory(tmp: Path, path: Path, between=None) -> None:
    """Move the finished folder ``tmp`` onto ``path`` (same file system), replacing an older folder
    there. Linux cannot rename a folder over a non-empty one, so an old folder is first moved aside
    to ``NAME.old-*`` (``between()`` runs then: the fault point of a test) and removed after; a crash
    between the two renames leaves it there for the caller to name or clean."""
    import shutil

    old = None
    if path.is_dir() and any(path.iterdir()):
        old = path.with_name(f"{path.name}.old-{os.urandom(4).hex()}")
        os.replace(path, old)
        if between is not None:
            between()
    elif path.is_dir():
        path.rmdir()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_directory(path: str | Path, write) -> Path:
    """Call ``write(folder)`` on a fresh temporary folder next to ``path``, then move it onto
    ``path`` (replacing an older folder there): readers see the old folder or the whole new one,
    never a half-written one. Linux cannot rename a folder over a non-empty one, so an old folder
    is first moved aside to ``NAME.old-*`` and removed after; a crash between the two renames
    leaves it there. A failing ``write`` leaves ``path`` as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders; give the usual permissions
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Save a training state (tensors, numbers, strings, lists, dicts) atomically, with the
    SHA-256 of its payload in a header line (see the module)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = b"%s %d %s %d\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode(), len(payload))

    def write(f) -> None:
        f.write(header)
        if fault_armed("checkpoint-write"):  # a crash with half of the payload written
            half = len(payload) // 2
            f.write(payload[:half])
            f.flush()
            fault_point("checkpoint-write")
            f.write(payload[half:])
        else:
            f.write(payload)

    atomic_write(path, write)
    del payload
    # temporary files of writes that a crash interrupted (only one process writes a checkpoint)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def _verify(header: bytes, payload: bytes, path: Path) -> None:
    """Check a checkpoint's payload against its header line; raise a DistillError that says what is wrong."""
    parts = header.split()
    if not header.endswith(b"\n") or len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
        raise DistillError(
            f"checkpoint {path} has a damaged header; it is corrupt: delete it to start this stage afresh"
        )
    version, digest, length = int(parts[1]), parts[2].decode("ascii", "replace"), int(parts[3])
    if version != VERSION:
        raise DistillError(
            f"checkpoint {path} has format version {version}; this distill reads version {VERSION}"
        )
    if len(payload) != length:
        raise DistillError(
            f"checkpoint {path} is truncated ({len(payload)} of {length} bytes) or has bytes appended; "
            "delete it to start this stage afresh"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise DistillError(
            f"checkpoint {path} is corrupt (its SHA-256 differs from the one written with it); "
            "delete it to start this stage afresh"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, after checking its length and
    SHA-256; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            header = f.readline(_HEADER_MAX) if f.read(len(MAGIC)) == MAGIC else None
            if header is None:  # written before checksums: nothing to verify
                f.seek(0)
            payload = f.read()
    except OSError as exc:
        raise DistillError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if header is not None:
        _verify(MAGIC + header, payload, path)
    elif not payload:
        raise DistillError(f"checkpoint {path} is empty; delete it to start this stage afresh")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holds objects we refuse to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"checkpoint {path} cannot be read safely ({first})") from None
    if not isinstance(state, dict):
        raise DistillError(f"checkpoint {path} does not hold a training state")
    return state
