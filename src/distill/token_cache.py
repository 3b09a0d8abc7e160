"""The token-level teacher cache: a text teacher run once, its outputs replayed per example and position.

For text (causal LMs, text classifiers, sentence encoders) the teacher's outputs are either one row
per **example** (a classifier's logits ``[B, C]``, a sentence embedding ``[B, D]``) or one row per
**token** (a causal LM's next-token logits ``[B, T, V]``, hidden states ``[B, T, H]``). Sequences have
different lengths, so per-token rows are stored **packed**: the real positions of example ``i``
(those its token mask marks) are rows ``offsets[i] : offsets[i + 1]`` of every per-token array, and
padding is never written. Logits may be stored as the top-k log-probabilities per row (values fp16 or
fp32, indices int32) and the tail mass (fp32, the probability outside the k), as in DistillKit's
offline mode, or as full rows (``topk=None``).

    build_token_cache(teacher, batches, "runs/a/teacher-cache", num_samples=len(train),
                      token_mask=task_mask, topk=64, fingerprint=stamp)
    signal = TokenCache("runs/a/teacher-cache", token_mask=task_mask, expect_fingerprint=stamp)

On disk a cache is a directory::

    header.json                 format, version, outputs (per example / per token, storage), SHA-256
                                of every array, the fingerprint
    offsets.npy                 int64 [N + 1]: example i's tokens are rows offsets[i]:offsets[i+1]
    <j>.values.npy              dense rows [rows, *shape] (fp16 or fp32), or with top-k storage:
    <j>.topk_values.npy         [rows, k] log-probabilities at T = 1
    <j>.topk_indices.npy        [rows, k] int32 token ids
    <j>.tail.npy                [rows] fp32, the probability mass outside the top k

(``rows`` is N for a per-example output and ``offsets[N]`` for a per-token one.) The directory is
built under a temporary name and renamed when complete; every array's SHA-256 is checked when the
cache is opened (a truncated or tampered file is refused before training), and the fingerprint
(teacher weights, data, tokenizer, vocabulary) must match the run's, the differing parts named.

Reading (:class:`TokenCache`, a :class:`~distill.signals.TeacherSignal`): a batch's examples are
looked up by ``batch["index"]`` and its per-token rows placed at the positions its token mask marks;
per-token top-k logits come back as a :class:`~distill.losses.token_divergences.TopK` (the token
losses read it directly, at temperature 1), so ``[B, T, V]`` teacher logits never exist; per-example
top-k logits are rebuilt dense (``C`` is small), as :class:`~distill.cache.TeacherCache` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.cache import (
    _STORE,
    _ArrayWriter,
    _check_destination,
    _discard,
    _json_hash,
    _model_device,
    _seal,
    _to_store,
    open_array,
    read_header,
    rebuild_logits,
    teacher_digest,
)
from distill.checkpoints import fault_point
from distill.errors import DistillError
from distill.losses.token_divergences import TopK
from distill.signals import Batch, Feed, LiveTeacher, default_feed
from distill.taps import LOGITS

FORMAT = "distill-token-cache"
VERSION = 1
HEADER = "header.json"
_REBUILD_HINT = "rebuild it with `distill cache`"
_ROWS_PER_CHUNK = 1024  # rows of [rows, V] log-softmax computed at once when reducing to top-k
# fingerprint part -> how messages name it
_PARTS = {"teacher": "teacher weights", "data": "data", "tokenizer": "tokenizer", "vocab": "vocabulary",
          "extra": "extra settings"}

#: a batch's token positions ``[B, T]`` (nonzero = a real token), or ``None`` when every position is
TokenMask = Callable[[Batch], "torch.Tensor | None"]
Progress = Callable[[int, int], None]


def token_fingerprint(
    teacher: nn.Module,
    *,
    data: bytes | str,
    tokenizer: Any,
    vocab: int | None,
    samples: int,
    extra: dict | None = None,
) -> dict[str, Any]:
    """What a token cache depends on, as SHA-256 hex digests: the teacher's weights, ``data`` (the
    task's bytes for the examples: token ids, lengths, labels), ``tokenizer`` (a JSON-able
    description: its vocabulary, merges or file digests), ``vocab`` (the vocabulary size) and
    ``extra``. ``"about"`` is a readable summary for messages, never compared."""
    data_bytes = data.encode() if isinstance(data, str) else bytes(data)
    return {
        "teacher": teacher_digest(teacher),
        "data": hashlib.sha256(data_bytes).hexdigest(),
        "tokenizer": _json_hash(tokenizer),
        "vocab": _json_hash(vocab),
        "extra": _json_hash(dict(extra or {})),
        "about": json.loads(json.dumps({"samples": samples, "vocab": vocab}, default=str)),
    }


# ------------------------------------------------------------------------------ writing
def _positions(mask: torch.Tensor | None, batch_size: int, width: int) -> torch.Tensor:
    """Bool ``[B, T]`` of the real positions (all of them without a mask)."""
    if mask is None:
        return torch.ones(batch_size, width, dtype=torch.bool)
    return mask.detach().cpu() != 0


def _per_token(tensor: torch.Tensor, real: torch.Tensor) -> bool:
    return tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(real.shape)


def _kind(name: str, tensor: torch.Tensor, real: torch.Tensor) -> str:
    if _per_token(tensor, real):
        return "token"
    if tensor.dim() == 2 or (tensor.dim() == 1 and name != LOGITS):
        return "example"
    raise DistillError(
        f"teacher output '{name}' has shape {tuple(tensor.shape)}: a token cache stores [B, F] per example "
        f"or [B, T, F] per token (T = the batch's {real.shape[1]} positions); taps of other shapes (attention "
        "maps [B, H, T, T]) need the live teacher"
    )


def _top_k(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities, their indices and the tail mass of logits ``[n, V]``, in chunks."""
    values, indices, tails = [], [], []
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        log_p = torch.log_softmax(rows[start:start + _ROWS_PER_CHUNK].float(), dim=-1)
        top, index = log_p.topk(k, dim=-1)
        # the tail summed from the tokens outside the top k, not as 1 - sum(top): no cancellation
        tails.append(log_p.exp().scatter(-1, index, 0.0).sum(-1))
        values.append(top.clamp_min(-1e4))
        indices.append(index)
    return torch.cat(values), torch.cat(indices), torch.cat(tails)


@torch.no_grad()
def _check_fingerprint(path: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    keys = list(_PARTS) + sorted((set(stored) | set(expected)) - set(_PARTS) - {"about"})
    differ = [key for key in keys if stored.get(key) != expected.get(key)]
    if not differ:
        return
    details = []
    was, now = stored.get("about", {}), expected.get("about", {})
    for key in ("samples", "vocab"):
        if was.get(key) != now.get(key):
            details.append(f"{key}: {was.get(key)} -> {now.get(key)}")
    detail = f" ({'; '.join(details)})" if details else ""
    raise DistillError(
        f"teacher cache {path} was made for something else: its "
        f"{' and '.join(_PARTS.get(k, k) for k in differ)} differ from this run's{detail}; {_REBUILD_HINT}"
    )


def _load_header(path: Path, kind: str, required: Sequence[str]) -> dict[str, Any]:
    """``header.json`` of the cache at ``path``, refused unless it is of format ``kind``, this
    version, and holds the ``required`` keys."""
    if not path.is_dir():
        raise DistillError(f"teacher cache {path} does not exist; build it with `distill cache`")
    what = "token-level teacher cache" if kind == FORMAT else "cache of teacher-written sequences"
    header = read_header(path, kind, VERSION, what)
    if any(key not in header for key in required):
        raise DistillError(f"{HEADER} of teacher cache {path} is incomplete; {_REBUILD_HINT}")
    return header


def build_token_cache(
    teacher: nn.Module,
    batches: Callable[[], Iterable[Batch]],
    path: str | Path,
    *,
    num_samples: int,
    token_mask: TokenMask,
    fingerprint: dict[str, Any],
    taps: Sequence[str] = (),
    topk: int | None = None,
    dtype: str = "fp16",
    progress: Progress | None = None,
    feed: Feed = default_feed,
) -> Path:
    """Run ``teacher`` (eval mode, no gradients) over every example once and store its outputs.

    ``batches()`` returns an iterable of batches that covers each of the ``num_samples`` examples
    exactly once, each batch with ``"index"`` (int64 ``[B]``); it is called twice (once to count
    the real tokens from ``token_mask``, once to run the teacher), so it must give the same batches
    both times. ``topk=k`` stores the teacher's logits as top-k log-probabilities and the tail mass;
    other outputs (``taps``) are stored dense in ``dtype``. ``progress(done, total)`` counts examples.
    An existing cache at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    if dtype not in _STORE:
        raise DistillError(f"unknown cache dtype '{dtype}'; use fp16 or fp32")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise DistillError(f"topk must be a positive integer or None (full rows), got {topk!r}")
    if num_samples < 1:
        raise DistillError("the data set is empty; there is nothing to cache")
    tap_names = [t for t in dict.fromkeys(taps) if t != LOGITS]
    names = [LOGITS, *tap_names]
    _check_destination(path)
    store = _STORE[dtype]
    live = LiveTeacher(teacher, device=_model_device(teacher), feed=feed)
    live.validate_taps(tap_names)

    # pass 1: how many real tokens each example has (no teacher)
    lengths = np.full(num_samples, -1, dtype=np.int64)
    for batch in batches():
        index = _indices(batch, num_samples)
        real = _positions(token_mask(batch), len(index), _width(batch))
        lengths[index] = real.sum(1).numpy()
    if (lengths < 0).any():
        raise DistillError(f"the cache's batches left out example {int(np.argmax(lengths < 0))}; they must cover "
                           "every example once")
    offsets = np.zeros(num_samples + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total_tokens = int(offsets[-1])

    was_training = teacher.training
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    writers: dict[str, _ArrayWriter] = {}
    outputs: dict[str, dict[str, Any]] = {}
    try:
        done = 0
        for batch in batches():
            index = _indices(batch, num_samples)
            real = _positions(token_mask(batch), len(index), _width(batch))
            out = live.outputs(batch, tap_names)
            if not outputs:
                outputs = _layout(out, names, real, topk)
                writers = _open(tmp, outputs, num_samples, total_tokens, topk, store)
            for name in names:
                _write(writers, name, outputs[name], out[name], real, index, offsets, topk, store)
            fault_point("cache-write")  # tests: DISTILL_FAULT=cache-write:N kills the build here
            done += len(index)
            if progress is not None:
                progress(done, num_samples)
        offsets_writer = _ArrayWriter(tmp, "offsets", offsets.shape, np.int64)
        offsets_writer.array[:] = offsets
        arrays = {name: writer.close() for name, writer in writers.items()}
        arrays["offsets"] = offsets_writer.close()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": num_samples,
            "tokens": total_tokens,
            "topk": topk,
            "dtype": dtype,
            "outputs": outputs,
            "arrays": arrays,
            "fingerprint": fingerprint,
        }
        _seal(tmp, path, header)
    except BaseException:
        _discard(tmp, writers)
        raise
    finally:
        teacher.train(was_training)
    return path


def _indices(batch: Batch, num_samples: int) -> np.ndarray:
    index = batch.get("index")
    if index is None:
        raise DistillError("a token cache looks examples up by batch['index'], but the batch has none")
    rows = torch.as_tensor(index).detach().cpu().numpy().astype(np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_samples):
        bad = int(rows.max() if rows.max() >= num_samples else rows.min())
        raise DistillError(f"example index {bad} is outside the token cache's {num_samples} examples; was it "
                           f"built for another data set? {_REBUILD_HINT}")
    return rows


def _width(batch: Batch) -> int:
    """The token positions of a batch whose mask is None (every position): its first [B, T] tensor."""
    for key in ("input", "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    return 1


def _layout(out: dict[str, torch.Tensor], names: list[str], real: torch.Tensor, topk: int | None) -> dict:
    layout = {}
    for j, name in enumerate(names):
        tensor = out[name]
        kind = _kind(name, tensor, real)
        feature = list(tensor.shape[2:] if kind == "token" else tensor.shape[1:])
        entry: dict[str, Any] = {"array": str(j), "per": kind, "shape": feature, "storage": "dense"}
        if name == LOGITS and topk is not None:
            width = feature[-1] if feature else 1
            if len(feature) != 1:
                raise DistillError(f"top-k storage needs logits [B, C] or [B, T, V], got {list(tensor.shape)}")
            if topk > width:
                raise DistillError(f"topk={topk} exceeds the teacher's {width} outputs; choose topk <= {width}")
            entry["storage"] = "topk"
        layout[name] = entry
    return layout


def _open(folder: Path, layout: dict, n: int, tokens: int, topk: int | None, store: Any) -> dict[str, _ArrayWriter]:
    writers = {}
    for entry in layout.values():
        rows, j = (tokens if entry["per"] == "token" else n), entry["array"]
        if entry["storage"] == "topk":
            writers[f"{j}.topk_values"] = _ArrayWriter(folder, f"{j}.topk_values", (rows, topk), store)
            writers[f"{j}.topk_indices"] = _ArrayWriter(folder, f"{j}.topk_indices", (rows, topk), np.int32)
            writers[f"{j}.tail"] = _ArrayWriter(folder, f"{j}.tail", (rows,), np.float32)
        else:
            writers[f"{j}.values"] = _ArrayWriter(folder, f"{j}.values", (rows, *entry["shape"]), store)
    return writers


def _write(writers: dict[str, _ArrayWriter], name: str, entry: dict, tensor: torch.Tensor, real: torch.Tensor,
           index: np.ndarray, offsets: np.ndarray, topk: int | None, store: Any) -> None:
    if entry["per"] == "token":
        rows = _packed_rows(real, index, offsets)
        values = tensor.detach()[real.to(tensor.device)]
    else:
        rows = index
        values = tensor.detach().reshape(len(index), *entry["shape"])
    j = entry["array"]
    if entry["storage"] == "dense":
        writers[f"{j}.values"].array[rows] = _to_store(values, store, f"'{name}' outputs")
        return
    _to_store(values, np.float32, "logits")  # refuses NaN and infinities
    top, ids, tail = _top_k(values, topk)
    writers[f"{j}.topk_values"].array[rows] = _to_store(top, store, "log-probabilities")
    writers[f"{j}.topk_indices"].array[rows] = ids.cpu().numpy().astype(np.int32)
    writers[f"{j}.tail"].array[rows] = tail.float().cpu().numpy()


def _packed_rows(real: torch.Tensor, index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The packed row of every real position of the batch, in row-major order of ``real``."""
    rank = (torch.cumsum(real.long(), 1) - 1)[real].numpy()  # the position's rank among its example's real ones
    example = np.repeat(np.arange(len(index)), real.sum(1).numpy())
    rows = offsets[index][example] + rank
    over = rows >= offsets[index + 1][example]
    if over.any():
        raise DistillError(f"example {int(index[example[over][0]])} has more real tokens than the cache counted; "
                           "the batches must be the same both times")
    return rows


# ------------------------------------------------------------------------------ reading
class TokenCache:
    """A :class:`~distill.signals.TeacherSignal` that replays a cache written by :func:`build_token_cache`.

    ``outputs(batch, taps)`` looks the batch's examples up by ``batch["index"]``: per-example outputs
    come back as ``[B, ...]``; per-token outputs as ``[B, T, ...]`` with the stored rows at the
    positions ``token_mask(batch)`` marks (zeros elsewhere), after checking that each example has as
    many real positions as the cache stored. Per-token top-k logits come back as a
    :class:`~distill.losses.token_divergences.TopK` (log-probabilities, int64 indices, tail mass;
    padding positions hold a uniform top-k with no tail); per-example top-k logits as rebuilt
    log-probabilities ``[B, C]``, the tail spread evenly. All in fp32 on the batch's device.

    Opening reads ``header.json``, compares ``expect_fingerprint`` (from :func:`token_fingerprint`)
    with the stored one, naming the parts that differ, and, when ``verify``, checks every array's
    SHA-256 (a full read of the cache).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        token_mask: TokenMask,
        expect_fingerprint: dict | None = None,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.token_mask = token_mask
        self.header = self._read_header()
        if expect_fingerprint is not None:
            self.check_fingerprint(expect_fingerprint)
        self._arrays = {name: open_array(self.path, entry, verify) for name, entry in self.header["arrays"].items()}
        self.offsets = torch.from_numpy(np.array(self._arrays["offsets"]))
        self.num_samples: int = self.header["num_samples"]
        self.topk: int | None = self.header["topk"]
        self.taps: list[str] = [name for name in self.header["outputs"] if name != LOGITS]
        if len(self.offsets) != self.num_samples + 1 or int(self.offsets[-1]) != self.header["tokens"]:
            raise DistillError(f"offsets of token cache {self.path} disagree with its {HEADER}; {_REBUILD_HINT}")

    def __repr__(self) -> str:
        storage = f"top-{self.topk}" if self.topk else "full rows"
        return (f"TokenCache({str(self.path)!r}, examples={self.num_samples}, tokens={self.header['tokens']}, "
                f"{storage} {self.header['dtype']}, taps={self.taps})")

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.header["fingerprint"]

    def _read_header(self) -> dict[str, Any]:
        path = self.path
        header = _load_header(path, FORMAT, ("num_samples", "tokens", "topk", "dtype", "outputs", "arrays",
                                             "fingerprint"))
        if LOGITS not in header["outputs"] or "offsets" not in header["arrays"]:
            raise DistillError(f"{HEADER} of teacher cache {path} is incomplete; {_REBUILD_HINT}")
        for entry in header["outputs"].values():
            parts = ("topk_values", "topk_indices", "tail") if entry["storage"] == "topk" else ("values",)
            absent = [f"{entry['array']}.{p}" for p in parts if f"{entry['array']}.{p}" not in header["arrays"]]
            if absent:
                raise DistillError(f"{HEADER} of teacher cache {path} lists no array {', '.join(absent)}; {_REBUILD_HINT}")
        return header

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        """Raise unless ``expected`` (from :func:`token_fingerprint`) equals the stored fingerprint,
        naming the parts that differ (teacher weights, data, tokenizer, vocabulary)."""
        _check_fingerprint(self.path, self.fingerprint, expected)

    # -- the TeacherSignal protocol --------------------------------------------------------
    def validate_taps(self, taps: Sequence[str]) -> None:
        missing = [t for t in taps if t != LOGITS and t not in self.header["outputs"]]
        if missing:
            raise DistillError(
                f"tap {', '.join(repr(t) for t in missing)} is not in teacher cache {self.path} (cached taps: "
                f"{', '.join(self.taps) or 'none'}); rebuild it with `distill cache` and these taps"
            )

    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, Any]:
        self.validate_taps(taps)
        index = _indices(batch, self.num_samples)
        device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        real = None
        out: dict[str, Any] = {}
        for name in dict.fromkeys([LOGITS, *taps]):
            entry = self.header["outputs"][name]
            if entry["per"] == "token":
                if real is None:
                    real = self._real(batch, index)
                rows = torch.from_numpy(_packed_rows(real, index, self.offsets.numpy()))
            else:
                rows = torch.from_numpy(index)
            out[name] = self._fetch(entry, rows, real, device)
        return out

    def _real(self, batch: Batch, index: np.ndarray) -> torch.Tensor:
        real = _positions(self.token_mask(batch), len(index), _width(batch))
        stored = (self.offsets[1:] - self.offsets[:-1])[torch.from_numpy(index)]
        count = real.sum(1)
        if not torch.equal(count, stored):
            i = int((count != stored).nonzero()[0])
            raise DistillError(
                f"example {int(index[i])} has {int(count[i])} tokens in this batch but {int(stored[i])} in teacher "
                f"cache {self.path}: the cache was made with another tokenizer or max_length; {_REBUILD_HINT}"
            )
        return real

    def _rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._arrays[name][rows.numpy()]))

    def _fetch(self, entry: dict, rows: torch.Tensor, real: torch.Tensor | None, device: torch.device):
        j, shape = entry["array"], entry["shape"]
        if entry["storage"] == "dense":
            values = self._rows(f"{j}.values", rows).float()
            return self._place(values, real, shape).to(device)
        top = self._rows(f"{j}.topk_values", rows).float()
        ids = self._rows(f"{j}.topk_indices", rows).long()
        tail = self._rows(f"{j}.tail", rows).float()
        if entry["per"] == "example":
            return rebuild_logits(top, ids, tail, shape[-1]).to(device)
        k = top.shape[-1]
        b, t = real.shape
        log_probs = torch.full((b, t, k), -math.log(k))
        indices = torch.arange(k).expand(b, t, k).clone()
        tails = torch.zeros(b, t)
        log_probs[real], indices[real], tails[real] = top, ids, tail
        return TopK(log_probs.to(device), indices.to(device), tails.to(device))

    @staticmethod
    def _place(values: torch.Tensor, real: torch.Tensor | None, shape: list[int]) -> torch.Tensor:
        if real is None:
            return values
        placed = values.new_zeros(*real.shape, *shape)
        placed[real] = values
        return placed


# ------------------------------------------------------------------------------ teacher-written text
SEQUENCES_FORMAT = "distill-teacher-sequences"


def build_sequence_cache(inputs: torch.Tensor, targets: torch.Tensor, path: str | Path, *,
                         fingerprint: dict[str, Any]) -> Path:
    """Store the blocks a teacher wrote for sequence-level KD: token ids ``inputs`` and ``targets``
    (``[N, T]``, kept as int32), with the fingerprint of the teacher, data, tokenizer and sampling
    settings (``token_fingerprint(..., extra=...)``). Built aside, each array's SHA-256 in
    ``header.json``, moved into place when complete (an older cache there is replaced)."""
    path = Path(path)
    if inputs.dim() != 2 or inputs.shape != targets.shape:
        raise DistillError(f"teacher-written sequences must be two [N, T] tensors of token ids, got "
                           f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    if inputs.numel() and max(int(inputs.max()), int(targets.max())) >= 2**31:
        raise DistillError("token ids beyond int32 cannot be stored in a sequence cache")
    _check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    writers: dict[str, _ArrayWriter] = {}
    try:
        for name, values in (("inputs", inputs), ("targets", targets)):
            writers[name] = _ArrayWriter(tmp, name, tuple(values.shape), np.int32)
            writers[name].array[:] = values.detach().cpu().numpy().astype(np.int32)
        arrays = {name: writer.close() for name, writer in writers.items()}
        header = {"format": SEQUENCES_FORMAT, "version": VERSION, "num_samples": int(inputs.shape[0]),
                  "arrays": arrays, "fingerprint": fingerprint}
        _seal(tmp, path, header)
    except BaseException:
        _discard(tmp, writers)
        raise
    return path


class SequenceCache:
    """Blocks a teacher wrote, read back from :func:`build_sequence_cache`'s folder: ``inputs`` and
    ``targets`` (int64 ``[N, T]``). Opening compares ``expect_fingerprint`` (the differing parts named)
    and, when ``verify``, every array's SHA-256."""

    def __init__(self, path: str | Path, *, expect_fingerprint: dict | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        self.header = _load_header(self.path, SEQUENCES_FORMAT, ("num_samples", "arrays", "fingerprint"))
        if expect_fingerprint is not None:
            _check_fingerprint(self.path, self.header["fingerprint"], expect_fingerprint)
        arrays = self.header["arrays"]
        if set(arrays) != {"inputs", "targets"}:
            raise DistillError(f"{HEADER} of teacher cache {self.path} is incomplete; {_REBUILD_HINT}")
        self.inputs, self.targets = (torch.from_numpy(np.array(open_array(self.path, arrays[name], verify))).long()
                                     for name in ("inputs", "targets"))
        if len(self.inputs) != self.header["num_samples"]:
            raise DistillError(f"teacher cache {self.path} holds {len(self.inputs)} sequences, its {HEADER} says "
                               f"{self.header['num_samples']}; {_REBUILD_HINT}")

    def __repr__(self) -> str:
        return f"SequenceCache({str(self.path)!r}, sequences={tuple(self.inputs.shape)})"


class TeacherText:
    """A teacher signal for sequence-level KD from a cache: the live teacher (it scores the text it
    wrote, for terms that read it) and ``sequences``, the text it wrote once (a :class:`SequenceCache`);
    the task's batch transform trains on that text instead of having the teacher write it again."""

    def __init__(self, live: LiveTeacher, sequences: SequenceCache) -> None:
        self.live = live
        self.model = live.model
        self.sequences = sequences

    def validate_taps(self, taps: Sequence[str]) -> None:
        self.live.validate_taps(taps)

    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, Any]:
        return self.live.outputs(batch, taps)
