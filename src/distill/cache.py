"""The teacher cache: run the teacher once over the data set, replay its outputs while training.

Online distillation runs the teacher on every step; a cache runs it once per sample and view and
stores its logits (dense, or top-k) and tapped features, so training costs about what training the
student alone costs.

    loader = BatchLoader(data.train, 128, shuffle=True, augment={"crop_padding": 4}, views=4)
    build_cache(teacher, loader, "runs/a/teacher-cache", taps=["layer3"], topk=10)
    signal = TeacherCache("runs/a/teacher-cache", expect_fingerprint=fingerprint(teacher, loader))
    distiller = Distiller(student, signal, terms=[...])   # looks outputs up by batch["index"/"view"]

With augmentation, the loader must replay a fixed set of views per sample (``views=K``, FKD: Shen &
Xing 2022, "A Fast Knowledge Distillation Framework for Visual Recognition"): the student then sees
exactly the inputs the teacher saw when the cache was built.

On disk a cache is a directory::

    header.json            format, version, shapes, dtypes, taps, SHA-256 of every array, fingerprint
    logits.npy             dense [N, V, C] (fp16 or fp32), or, with top-k storage:
    topk_values.npy        [N, V, k] log-probabilities at T=1 (fp16 or fp32)
    topk_indices.npy       [N, V, k] class indices (int16, or int32 beyond 32767 classes)
    tail.npy               [N, V] fp32, the probability mass outside the top k
    tap_<j>.npy            [N, V, *shape] per tapped feature (fp16 or fp32)

Arrays are ``.npy`` files read memory-mapped. The directory is built under a temporary name
beside ``path`` and renamed onto it when complete, so an interrupted build never looks like a cache.
The **fingerprint** hashes the teacher's weights, the data and the transforms; a cache opened with
``expect_fingerprint`` refuses to serve a run it was not made for.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from distill.checkpoints import atomic_write, fault_point, fsync_dir, replace_directory
from distill.data.loader import BatchLoader
from distill.errors import DistillError
from distill.signals import Batch, Feed, LiveTeacher, default_feed
from distill.taps import LOGITS

FORMAT = "distill-teacher-cache"
# every cache a build may replace: this module's, and distill.token_cache's (examples and tokens;
# teacher-written sequences)
CACHE_FORMATS = (FORMAT, "distill-token-cache", "distill-teacher-sequences")
VERSION = 1
HEADER = "header.json"
_STORE = {"fp16": np.float16, "fp32": np.float32}
# fingerprint part -> how messages name it
_PARTS = {"teacher": "teacher weights", "data": "data", "transforms": "transforms", "extra": "extra settings"}
_TINY = 1e-30  # floor of the tail mass, so rebuilt log-probabilities stay finite
_REBUILD_HINT = "rebuild it with `distill cache`"

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------ fingerprint
def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` (any dtype, any device) in row-major order."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _json_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_views(loader: BatchLoader, views: int | None = None) -> int:
    """The number of views a cache of ``loader`` holds; raises if the loader cannot replay them.

    ``None`` follows the loader (``loader.views``, or 1 when it has none). A loader that draws fresh
    augmentation every epoch is refused: no cache can hold inputs that are not yet drawn.
    """
    if views is None:
        views = loader.views or 1
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise DistillError(f"views must be a positive integer, got {views!r}")
    if loader.views is not None and loader.views != views:
        raise DistillError(
            f"views={views} but the loader replays {loader.views} views; give both the same number"
        )
    if loader.views is None and loader.augmenting:
        raise DistillError(
            "the loader draws fresh augmentation every epoch, which a teacher cache cannot replay; "
            "build the BatchLoader with views=K (K fixed views per sample) or turn augmentation off"
        )
    if loader.views is None and views > 1:
        raise DistillError(
            f"views={views} needs a loader built with views={views}, so that training shows the "
            "views the cache holds"
        )
    return views


def views_in_use(loader: BatchLoader) -> bool:
    return getattr(loader, "views", None) is not None


def _transforms(loader: BatchLoader, views: int) -> dict[str, Any]:
    described: dict[str, Any] = {
        "scale": "uint8/255" if loader.dataset.inputs.dtype == torch.uint8 else "none",
        "mean": loader._mean,
        "std": loader._std,
        "crop_padding": loader.padding,
        "flip": loader.flip,
        "views": views,
    }
    # the seed picks the crops and flips; without augmentation it changes no input the teacher saw,
    # so a cache stays valid for runs with another seed
    if loader.augmenting:
        described["seed"] = loader.view_seed if views_in_use(loader) else loader.seed
    return described


def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 of every state_dict tensor of ``teacher`` (name, dtype, shape, bytes)."""
    weights = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        weights.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        weights.update(_raw_bytes(tensor))
    return weights.hexdigest()


def fingerprint(
    teacher: nn.Module,
    loader: BatchLoader,
    views: int | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """What a cache of ``teacher`` over ``loader`` depends on, as SHA-256 hex digests.

    ``"teacher"``: every state_dict tensor (name, dtype, shape, bytes); ``"data"``: N, the inputs'
    shape, dtype and bytes, and the targets; ``"transforms"``: scaling, mean/std, crop/flip settings,
    views (and the seed when augmenting); ``"extra"``: ``extra`` as JSON (anything else the caller
    wants a cache tied to, such as the feed or task). ``"about"`` is a readable summary used in error
    messages and never compared. ``views`` defaults to the loader's (see :func:`resolve_views`).
    """
    views = resolve_views(loader, views)
    inputs, targets = loader.dataset.inputs, loader.dataset.targets.long()
    data = hashlib.sha256()
    data.update(f"{len(targets)}|{tuple(inputs.shape)}|{inputs.dtype}\n".encode())
    data.update(_raw_bytes(inputs))
    data.update(_raw_bytes(targets))
    transforms = _transforms(loader, views)
    extra = dict(extra or {})
    return {
        "teacher": teacher_digest(teacher),
        "data": data.hexdigest(),
        "transforms": _json_hash(transforms),
        "extra": _json_hash(extra),
        # through JSON, so the summary compares equal to the one read back from a header
        "about": json.loads(json.dumps({"samples": len(targets), "transforms": transforms, "extra": extra}, default=str)),
    }


# ------------------------------------------------------------------------------ writing
def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _ArrayWriter:
    """One ``.npy`` array filled batch by batch through a memory map, renamed into place on close."""

    def __init__(self, folder: Path, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.file = f"{name}.npy"
        self.final = folder / self.file
        self.part = folder / f".{self.file}.part"
        self.array = open_memmap(self.part, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> dict[str, Any]:
        shape, dtype = list(self.array.shape), str(self.array.dtype)
        self.array.flush()
        del self.array  # unmaps the file
        with open(self.part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.part, self.final)
        return {"file": self.file, "shape": shape, "dtype": dtype, "sha256": _sha256_file(self.final)}


def _to_store(values: torch.Tensor, dtype: Any, what: str) -> np.ndarray:
    """``values`` as a numpy array of ``dtype``; refuses non-finite values and fp16 overflow."""
    source = values.detach().float().cpu().numpy()
    if not np.isfinite(source).all():
        raise DistillError(f"the teacher's {what} hold NaN or infinite values; check the teacher before caching it")
    with np.errstate(over="ignore"):  # overflow is reported below, in words that name the fix
        stored = source.astype(dtype)
    if not np.isfinite(stored).all():
        raise DistillError(
            f"the teacher's {what} exceed the fp16 range (|x| > 65504); build the cache with dtype='fp32'"
        )
    return stored


def _is_cache(path: Path) -> bool:
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") in CACHE_FORMATS


def _check_destination(path: Path) -> None:
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise DistillError(f"{path} is a file, not a teacher cache; choose another path or remove it")
    if path.is_dir() and any(path.iterdir()) and not _is_cache(path):
        raise DistillError(f"{path} exists and is not a teacher cache; choose another path or remove it")


def _install(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` directory onto ``path``, replacing an older cache there (a crash
    between the two renames leaves the old one as NAME.old-*, which a reader names)."""
    # tests: DISTILL_FAULT=cache-install:N kills the build between the renames
    replace_directory(tmp, path, between=lambda: fault_point("cache-install"))
    for old in _set_aside(path):  # any left by an interrupted replacement
        shutil.rmtree(old, ignore_errors=True)


def _seal(tmp: Path, path: Path, header: dict[str, Any]) -> None:
    """Write a finished build's ``header.json`` into ``tmp`` and move ``tmp`` onto ``path``."""
    atomic_write(tmp / HEADER, lambda f: f.write(json.dumps(header, indent=2).encode()))
    fsync_dir(tmp)
    _install(tmp, path)


def _discard(tmp: Path, writers: dict[str, "_ArrayWriter"]) -> None:
    """Drop an interrupted build: unmap its arrays, remove ``tmp``."""
    for writer in writers.values():
        writer.__dict__.pop("array", None)
    shutil.rmtree(tmp, ignore_errors=True)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def build_cache(
    teacher: nn.Module,
    loader: BatchLoader,
    path: str | Path,
    *,
    taps: Sequence[str] = (),
    views: int | None = None,
    topk: int | None = None,
    dtype: str = "fp16",
    fingerprint_extra: dict | None = None,
    progress: Progress | None = None,
    feed: Feed = default_feed,
) -> Path:
    """Run ``teacher`` (eval mode, no gradients) over every sample and view of ``loader``; store
    its outputs in the directory ``path`` and return ``path``.

    Samples are visited in index order for each view ``v`` in ``range(views)``, in batches of
    ``loader.batch_size``, with the inputs of :meth:`BatchLoader.view_inputs` (the order, rank and
    epoch of the loader play no part). ``views`` defaults to the loader's (1 without replayed
    views). ``dtype`` (``"fp16"``/``"fp32"``) stores dense logits, top-k values and features;
    ``topk=k`` stores the k largest log-probabilities per sample and the tail mass instead of dense
    logits. The teacher runs on the device of its parameters. ``progress(done, total)`` is called
    after each batch with counts of (sample, view) pairs. An existing cache at ``path`` is replaced
    only once the new one is complete.
    """
    path = Path(path)
    if dtype not in _STORE:
        raise DistillError(f"unknown cache dtype '{dtype}'; use fp16 or fp32")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise DistillError(f"topk must be a positive integer or None (dense logits), got {topk!r}")
    views = resolve_views(loader, views)
    tap_names = [t for t in dict.fromkeys(taps) if t != LOGITS]
    _check_destination(path)
    n = len(loader.dataset)
    if n == 0:
        raise DistillError("the data set is empty; there is nothing to cache")
    store = _STORE[dtype]
    device = _model_device(teacher)
    was_training = teacher.training
    live = LiveTeacher(teacher, device=device, feed=feed)
    live.validate_taps(tap_names)
    stamp = fingerprint(teacher, loader, views, fingerprint_extra)
    targets = loader.dataset.targets.long()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    writers: dict[str, _ArrayWriter] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        done, total = 0, n * views
        for v in range(views):
            for start in range(0, n, loader.batch_size):
                index = torch.arange(start, min(start + loader.batch_size, n))
                batch = {
                    "input": loader.view_inputs(index, v).to(device),
                    "target": targets[index].to(device),
                    "index": index.to(device),
                    "view": torch.full_like(index, v).to(device),
                }
                out = live.outputs(batch, tap_names)
                if not writers:
                    shapes = {k: tuple(t.shape[1:]) for k, t in out.items()}
                    writers = _open_writers(tmp, n, views, shapes, tap_names, topk, store)
                for name, tensor in out.items():
                    if tuple(tensor.shape[1:]) != shapes[name] or len(tensor) != len(index):
                        raise DistillError(
                            f"teacher output '{name}' has shape {tuple(tensor.shape)} on samples {start}.., "
                            f"but {(len(index),) + shapes[name]} was expected; a cache needs every sample "
                            "to give the same shape"
                        )
                _write_batch(writers, out, tap_names, start, v, topk, store)
                fault_point("cache-write")  # tests: DISTILL_FAULT=cache-write:N kills the build here
                done += len(index)
                if progress is not None:
                    progress(done, total)
        arrays = {name: writer.close() for name, writer in writers.items()}
        logits_shape = shapes[LOGITS]
        header = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": n,
            "views": views,
            "classes": logits_shape[-1] if logits_shape else 1,
            "logits_shape": list(logits_shape),
            "topk": topk,
            "dtype": dtype,
            "taps": {tap: {"array": f"tap_{j}", "shape": list(shapes[tap])} for j, tap in enumerate(tap_names)},
            "arrays": arrays,
            "fingerprint": stamp,
        }
        _seal(tmp, path, header)
    except BaseException:
        _discard(tmp, writers)
        raise
    finally:
        teacher.train(was_training)
    return path


def _open_writers(
    folder: Path,
    n: int,
    views: int,
    shapes: dict[str, tuple[int, ...]],
    tap_names: list[str],
    topk: int | None,
    store: Any,
) -> dict[str, _ArrayWriter]:
    logits_shape = shapes[LOGITS]
    if not logits_shape:
        raise DistillError("the teacher's logits are one number per sample; a cache needs [B, ..., C] logits")
    writers: dict[str, _ArrayWriter] = {}
    if topk is None:
        writers["logits"] = _ArrayWriter(folder, "logits", (n, views) + logits_shape, store)
    else:
        classes = logits_shape[-1]
        if topk > classes:
            raise DistillError(f"topk={topk} exceeds the teacher's {classes} classes; choose topk <= {classes}")
        index_dtype = np.int16 if classes <= np.iinfo(np.int16).max else np.int32
        lead = (n, views) + logits_shape[:-1]
        writers["topk_values"] = _ArrayWriter(folder, "topk_values", lead + (topk,), store)
        writers["topk_indices"] = _ArrayWriter(folder, "topk_indices", lead + (topk,), index_dtype)
        writers["tail"] = _ArrayWriter(folder, "tail", lead, np.float32)
    for j, tap in enumerate(tap_names):
        writers[f"tap_{j}"] = _ArrayWriter(folder, f"tap_{j}", (n, views) + shapes[tap], store)
    return writers


def _write_batch(
    writers: dict[str, _ArrayWriter],
    out: dict[str, torch.Tensor],
    tap_names: list[str],
    start: int,
    view: int,
    topk: int | None,
    store: Any,
) -> None:
    rows = slice(start, start + len(out[LOGITS]))
    logits = out[LOGITS]
    if topk is None:
        writers["logits"].array[rows, view] = _to_store(logits, store, "logits")
    else:
        _to_store(logits, np.float32, "logits")  # refuses NaN and infinities
        log_p = torch.log_softmax(logits.double(), dim=-1)
        top, index = log_p.topk(topk, dim=-1)
        # the tail summed from the classes outside the top k, not as 1 - sum(top): no cancellation
        tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
        writers["topk_values"].array[rows, view] = _to_store(top.clamp_min(-1e4), store, "log-probabilities")
        writers["topk_indices"].array[rows, view] = index.cpu().numpy()
        writers["tail"].array[rows, view] = tail.float().cpu().numpy()
    for j, tap in enumerate(tap_names):
        writers[f"tap_{j}"].array[rows, view] = _to_store(out[tap], store, f"tap '{tap}' features")


# ------------------------------------------------------------------------------ reading
def open_array(folder: Path, entry: dict[str, Any], verify: bool) -> np.ndarray:
    """The ``.npy`` array of a cache's header ``entry`` (``file``, ``shape``, ``dtype``, ``sha256``),
    memory-mapped; refused when missing, of another shape or dtype, or (``verify``) its SHA-256 differs."""
    file = folder / entry["file"]
    if not file.is_file():
        raise DistillError(f"{file} is missing from teacher cache {folder}; {_REBUILD_HINT}")
    if verify and _sha256_file(file) != entry["sha256"]:
        raise DistillError(
            f"{file} is corrupt or truncated (its SHA-256 differs from {HEADER}); {_REBUILD_HINT}"
        )
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DistillError(f"{file} cannot be read ({exc}); {_REBUILD_HINT}") from None
    if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
        raise DistillError(
            f"{file} holds {array.dtype} {list(array.shape)}, but {HEADER} says {entry['dtype']} "
            f"{entry['shape']}; {_REBUILD_HINT}"
        )
    return array


def read_header(path: Path, kind: str, version: int, what: str) -> dict[str, Any]:
    """``header.json`` of the cache folder ``path``, refused (in words naming ``what`` it should be)
    unless it is readable, of format ``kind`` and of ``version``."""
    try:
        header = json.loads((path / HEADER).read_text())
    except FileNotFoundError:
        raise DistillError(f"{path} is not a teacher cache (it has no {HEADER}); build one with `distill cache`") from None
    except (OSError, ValueError) as exc:
        raise DistillError(f"{HEADER} of teacher cache {path} is unreadable ({exc}); {_REBUILD_HINT}") from None
    if not isinstance(header, dict) or header.get("format") != kind:
        found = header.get("format") if isinstance(header, dict) else None
        raise DistillError(f"{path} is not a {what} ({HEADER} is of another format: {found!r}); {_REBUILD_HINT}")
    if header.get("version") != version:
        raise DistillError(
            f"teacher cache {path} has format version {header.get('version')}, this distill reads "
            f"version {version}; {_REBUILD_HINT}"
        )
    return header


def _unfinished_builds(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.tmp-*"))


def _set_aside(path: Path) -> list[Path]:
    """Old caches moved aside by :func:`_install` (one is left only if it was interrupted)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.old-*"))


class TeacherCache:
    """A :class:`~distill.signals.TeacherSignal` that replays a cache written by :func:`build_cache`.

    ``outputs(batch, taps)`` looks the batch's samples up by ``batch["index"]`` (int64 ``[B]``) and,
    when the cache holds several views, ``batch["view"]`` (int64 ``[B]``), and returns
    ``{"logits": [B, C], tap: [B, ...]}`` in fp32 on the batch's device.

    With top-k storage, ``"logits"`` are rebuilt log-probabilities: ``log p`` for the k stored
    classes and ``log(tail / (C - k))`` for each of the others, which spreads the tail mass evenly.
    They are valid logits: their softmax gives back the stored top-k probabilities and tail mass.
    A temperature in a loss then softens this rebuilt distribution, not the teacher's original one.

    Opening reads ``header.json``, compares ``expect_fingerprint`` (from :func:`fingerprint`) with
    the stored one, and, when ``verify``, checks every array's SHA-256 (a full read of the cache).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        expect_fingerprint: dict | None = None,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.header = self._read_header()
        if expect_fingerprint is not None:
            self.check_fingerprint(expect_fingerprint)
        self._arrays = {name: open_array(self.path, entry, verify) for name, entry in self.header["arrays"].items()}
        self.num_samples: int = self.header["num_samples"]
        self.views: int = self.header["views"]
        self.classes: int = self.header["classes"]
        self.topk: int | None = self.header["topk"]
        self.taps: list[str] = list(self.header["taps"])

    def __repr__(self) -> str:
        storage = f"top-{self.topk}" if self.topk else "dense"
        return (
            f"TeacherCache({str(self.path)!r}, samples={self.num_samples}, views={self.views}, "
            f"classes={self.classes}, {storage} {self.header['dtype']}, taps={self.taps})"
        )

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint stored when the cache was built."""
        return self.header["fingerprint"]

    # -- opening ----------------------------------------------------------------------------
    def _read_header(self) -> dict[str, Any]:
        path = self.path
        if ".tmp-" in path.name:
            raise DistillError(
                f"{path} is an unfinished teacher cache (its build was interrupted); run `distill cache` again"
            )
        if not path.is_dir():
            unfinished, aside = _unfinished_builds(path), _set_aside(path)
            if aside and _is_cache(aside[-1]):
                raise DistillError(
                    f"teacher cache {path} does not exist, but {aside[-1].name} beside it is the cache it "
                    f"replaced (the replacement was interrupted); rename it to {path.name} or {_REBUILD_HINT}"
                )
            hint = (
                f" (found {unfinished[0].name}, an interrupted build)" if unfinished else ""
            )
            raise DistillError(f"teacher cache {path} does not exist{hint}; build it with `distill cache`")
        header = read_header(path, FORMAT, VERSION, "teacher cache")
        required = ("num_samples", "views", "classes", "logits_shape", "topk", "dtype", "taps", "arrays", "fingerprint")
        missing = [key for key in required if key not in header]
        if missing:
            raise DistillError(f"{HEADER} of teacher cache {path} lacks {', '.join(missing)}; {_REBUILD_HINT}")
        needed = ["logits"] if header["topk"] is None else ["topk_values", "topk_indices", "tail"]
        needed += [entry["array"] for entry in header["taps"].values()]
        absent = [name for name in needed if name not in header["arrays"]]
        if absent:
            raise DistillError(f"{HEADER} of teacher cache {path} lists no array {', '.join(absent)}; {_REBUILD_HINT}")
        return header

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        """Raise unless ``expected`` (from :func:`fingerprint`) equals the stored fingerprint."""
        stored = self.fingerprint
        keys = list(_PARTS) + sorted((set(stored) | set(expected)) - set(_PARTS) - {"about"})
        differ = [key for key in keys if stored.get(key) != expected.get(key)]
        if not differ:
            return
        names = [_PARTS.get(key, key) for key in differ]
        details = []
        if "transforms" in differ:
            was = stored.get("about", {}).get("transforms", {})
            now = expected.get("about", {}).get("transforms", {})
            changes = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
            if changes:
                details.append("transforms: " + ", ".join(changes))
        if "data" in differ:
            was_n = stored.get("about", {}).get("samples")
            now_n = expected.get("about", {}).get("samples")
            if was_n != now_n:
                details.append(f"data: {was_n} samples -> {now_n}")
        detail = f" ({'; '.join(details)})" if details else ""
        raise DistillError(
            f"teacher cache {self.path} was made for something else: its {' and '.join(names)} differ "
            f"from this run's{detail}; {_REBUILD_HINT}"
        )

    # -- the TeacherSignal protocol --------------------------------------------------------
    def validate_taps(self, taps: Sequence[str]) -> None:
        missing = [t for t in taps if t != LOGITS and t not in self.header["taps"]]
        if missing:
            cached = ", ".join(self.taps) or "none"
            raise DistillError(
                f"tap {', '.join(repr(t) for t in missing)} is not in teacher cache {self.path} "
                f"(cached taps: {cached}); rebuild it with `distill cache` and these taps"
            )

    def _lookup(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, torch.device]:
        index = batch.get("index")
        if index is None:
            raise DistillError(
                "a teacher cache looks samples up by batch['index'], but the batch has none; feed "
                "batches from a BatchLoader, or (input, target, index) tuples"
            )
        index = torch.as_tensor(index)
        device = batch["input"].device if isinstance(batch.get("input"), torch.Tensor) else index.device
        rows = index.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise DistillError(
                f"sample index {int(rows.max() if rows.max() >= self.num_samples else rows.min())} is "
                f"outside teacher cache {self.path}, which holds {self.num_samples} samples; was it "
                f"built for another data set? {_REBUILD_HINT}"
            )
        view = batch.get("view")
        if view is None:
            if self.views > 1:
                raise DistillError(
                    f"teacher cache {self.path} holds {self.views} views per sample, but the batch has no "
                    f"'view'; build the BatchLoader with views={self.views}"
                )
            cols = np.zeros_like(rows)
        else:
            cols = torch.as_tensor(view).detach().cpu().numpy().astype(np.int64).reshape(-1)
            if cols.shape != rows.shape:
                raise DistillError(f"the batch has {len(rows)} indices but {len(cols)} views")
            if len(cols) and (cols.min() < 0 or cols.max() >= self.views):
                raise DistillError(
                    f"the batch asks for view {int(cols.max())}, but teacher cache {self.path} holds "
                    f"{self.views} views per sample; build the loader with views={self.views}"
                )
        return rows, cols, device

    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """``{"logits": [B, C], tap: [B, ...]}`` in fp32 on the batch's device (see the class)."""
        self.validate_taps(taps)
        rows, cols, device = self._lookup(batch)

        def fetch(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self._arrays[name][rows, cols])).to(device)

        if self.topk is None:
            logits = fetch("logits").float()
        else:
            logits = self._rebuild(fetch("topk_values").float(), fetch("topk_indices").long(), fetch("tail"))
        out = {LOGITS: logits}
        for tap in dict.fromkeys(taps):
            if tap != LOGITS:
                out[tap] = fetch(self.header["taps"][tap]["array"]).float()
        return out

    def _rebuild(self, top: torch.Tensor, index: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return rebuild_logits(top, index, tail, self.classes)


def rebuild_logits(top: torch.Tensor, index: torch.Tensor, tail: torch.Tensor, classes: int) -> torch.Tensor:
    """Log-probabilities ``[B, ..., C]`` from top-k log-probabilities and indices ``[B, ..., k]``
    and the tail mass ``[B, ...]``, the tail spread evenly over the other ``C - k`` classes."""
    k = top.shape[-1]
    if classes > k:
        fill = torch.log(tail.float().clamp_min(_TINY) / (classes - k))
        logits = fill.unsqueeze(-1).expand(*fill.shape, classes).clone()
    else:
        logits = torch.empty(*top.shape[:-1], classes, device=top.device)
    return logits.scatter_(-1, index, top)
