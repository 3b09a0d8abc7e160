"""Profile a model as it would be deployed: parameters, bytes on disk, MACs, peak memory, latency.

    report = profile_model(model, input_shape=(3, 32, 32), batch=32, threads=1)
    report.latency["eager"][1].p50_ms, report.macs, report.peak_memory_bytes[32]

    profiles = profile_pair(teacher, student, (3, 32, 32))   # speed-ups: compare_profiles(profiles)

What each figure means:

- ``params``: parameters (shared ones once); ``size_bytes``: the length of the model's state dict
  serialised as safetensors (what ``student.safetensors`` takes on disk).
- ``macs``: multiply-accumulates of one forward pass of one sample, from
  ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). It counts the matrix products
  and convolutions that dominate the cost; element-wise work (activations, batch norm, pooling,
  the additions of biases) is not counted.
- ``peak_memory_bytes[b]``: on CPU, the most bytes of tensors that the forward pass of a batch of
  ``b`` allocated and held at the same time (activations and outputs; weights and the input are
  excluded). It is counted exactly at the ATen-operator level (every operator's new output storage
  is added when created and subtracted when freed), so it is deterministic and independent of the
  allocator; it does not include allocator overhead or scratch buffers that libraries (oneDNN)
  allocate outside tensors. The process's resident set (RSS) is not used: it never shrinks
  reliably and mixes in everything else the process holds. On CUDA it is
  ``torch.cuda.max_memory_allocated`` during the pass minus what was allocated before it.
- ``latency``: milliseconds of one forward pass (``p50``, ``p95`` over ``repeats`` timed runs after
  ``warmup`` untimed ones) at batch 1 and at ``batch``, with ``threads`` intra-op threads, in
  PyTorch eager (``torch.inference_mode``) and, when the ``onnx`` extra is installed, in ONNX Runtime
  (the same model exported to ONNX with :func:`distill.export.onnx_bytes`, run with
  ``intra_op_num_threads=threads``).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError

MEMORY_METHOD_CPU = "peak bytes of tensors allocated by the forward pass and alive at once (ATen operator level)"
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated during the pass minus memory allocated before it"


@dataclass
class Latency:
    """Milliseconds of one forward pass: median and 95th percentile over ``repeats`` runs."""

    p50_ms: float
    p95_ms: float
    repeats: int


@dataclass
class ModelProfile:
    name: str
    params: int
    size_bytes: int
    macs: int
    input_shape: tuple[int, ...]
    batch: int
    threads: int
    device: str
    peak_memory_bytes: dict[int, int]
    latency: dict[str, dict[int, Latency]]  # engine ("eager", "onnxruntime") -> batch -> latency
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["peak_memory_bytes"] = {str(b): v for b, v in self.peak_memory_bytes.items()}
        out["latency"] = {
            engine: {str(b): asdict(lat) for b, lat in by_batch.items()} for engine, by_batch in self.latency.items()
        }
        return out


# ------------------------------------------------------------------------------ the measures
def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state dict written as safetensors."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    return len(save(tensors))


def _call(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(**x)`` for named inputs (``input_ids``, ``attention_mask``)."""
    return model(**x) if isinstance(x, dict) else model(x)


def _to(x: Any, device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _repeat(x: Any, b: int) -> Any:
    """The first sample of ``x`` (a tensor or named tensors) repeated to a batch of ``b``."""
    if isinstance(x, dict):
        return {k: v[:1].expand(b, *v.shape[1:]).clone() for k, v in x.items()}
    return x[:1].expand(b, *x.shape[1:]).clone()


@torch.no_grad()
def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of ``model(example)`` (all of ``example``'s batch): FLOPs / 2 as counted
    by ``FlopCounterMode`` (matrix products and convolutions only)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        _call(model, example)
    model.train(was_training)
    return counter.get_total_flops() // 2


class _LiveTensorBytes:
    """Tracks bytes of tensor storages created by ATen operators while active (see the module)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.current = 0
        self.peak = 0
        self.live: dict[int, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._add(t.untyped_storage(), inputs)
                return out

        self.mode = Mode()

    def _add(self, storage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        # views and in-place results share an input's storage: nothing new was allocated
        if size == 0 or key in inputs or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@torch.no_grad()
def peak_memory(model: nn.Module, example: Any) -> int:
    """Peak bytes a forward pass of ``example`` needs beyond the weights and the input (see the module)."""
    device = next(iter(example.values())).device if isinstance(example, dict) else example.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = _call(model, example)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    tracker = _LiveTensorBytes()
    with tracker.mode:
        out = _call(model, example)
    del out
    return int(tracker.peak)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> Latency:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return Latency(p50_ms=statistics.median(times), p95_ms=percentile(times, 95), repeats=repeats)


# ------------------------------------------------------------------------------ one model
def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def profile_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    name: str | None = None,
    batch: int = 32,
    threads: int = 1,
    repeats: int = 30,
    warmup: int = 3,
    device: str = "cpu",
    onnx: bool | None = None,
    seed: int = 0,
    example: Any = None,
) -> ModelProfile:
    """Measure ``model`` on random inputs ``[b, *input_shape]`` for ``b`` in ``(1, batch)``
    (:func:`distill.export.random_inputs`: token ids for a model that starts with an embedding), or
    on ``example`` (a real input: a tensor, or named tensors such as ``input_ids`` and
    ``attention_mask`` for a model fed by keyword) repeated to each batch size.

    ``onnx``: also time ONNX Runtime (``None``: when the ``onnx`` extra is installed; ``True``:
    required). ``threads`` is set with ``torch.set_num_threads`` for the measurement and restored.
    The model is put in eval mode and left there.
    """
    if batch < 1 or threads < 1 or repeats < 1 or warmup < 0:
        raise DistillError("profile: batch, threads and repeats must be positive, warmup non-negative")
    from distill.signals import parse_device

    dev = parse_device(device)
    shape = tuple(int(d) for d in input_shape)
    name = name or type(model).__name__
    use_onnx = onnx_available() if onnx is None else onnx
    notes = []
    if onnx and not onnx_available():
        from distill.export import require_onnx

        require_onnx()
    if onnx is None and not use_onnx:
        notes.append("ONNX Runtime not timed: install the extra with `pip install distill[onnx]`")

    model = model.eval().to(dev)
    from distill.export import random_inputs

    batches = sorted({1, batch})
    if example is not None:  # a real input of batch 1 (e.g. user ids), repeated to each batch size
        inputs = {b: _to(_repeat(example, b), dev) for b in batches}
    else:
        inputs = {b: random_inputs(model, shape, b, seed).to(dev) for b in batches}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            _call(model, inputs[1])  # a first call builds lazy state (kernels, caches) outside the measures
        macs = count_macs(model, inputs[1])
        memory = {b: peak_memory(model, x) for b, x in inputs.items()}
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
        latency: dict[str, dict[int, Latency]] = {"eager": {}}
        with torch.inference_mode():
            for b, x in inputs.items():
                latency["eager"][b] = time_calls(lambda x=x: _call(model, x), repeats, warmup, sync)
        if use_onnx:
            latency["onnxruntime"] = _onnxruntime_latency(model, inputs, threads, dev, repeats, warmup, notes)
    finally:
        torch.set_num_threads(saved_threads)
    return ModelProfile(
        name=name, params=sum(p.numel() for p in model.parameters()), size_bytes=serialized_size(model),
        macs=macs, input_shape=shape, batch=batch, threads=threads, device=str(dev),
        peak_memory_bytes=memory, latency=latency, notes=notes,
    )


def _onnxruntime_latency(model, inputs, threads, dev, repeats, warmup, notes) -> dict[int, Latency]:
    from distill.export import onnx_bytes, onnx_session

    data = onnx_bytes(model, _to(inputs[1], "cpu"))
    session = onnx_session(data, threads=threads, device=str(dev))
    if dev.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        notes.append("ONNX Runtime timed on CPU: its CUDA provider is not installed (onnxruntime-gpu)")
    names = [i.name for i in session.get_inputs()]
    out = {}
    for b, x in inputs.items():
        feed = ({n: x[n].cpu().numpy() for n in names} if isinstance(x, dict) else {names[0]: x.cpu().numpy()})
        out[b] = time_calls(lambda feed=feed: session.run(None, feed), repeats, warmup)
    return out


def compare_profiles(profiles: Sequence[ModelProfile]) -> dict[str, dict[str, float]]:
    """Speed-ups and size ratios of each model against the first (the teacher):
    ``{name: {"eager_b1": first_p50 / its_p50, ..., "params": first / its, "macs": ...}}``."""
    if len(profiles) < 2:
        return {}
    ref = profiles[0]
    out = {}
    for other in profiles[1:]:
        ratios = {}
        for engine, by_batch in other.latency.items():
            for b, lat in by_batch.items():
                base = ref.latency.get(engine, {}).get(b)
                if base is not None and lat.p50_ms > 0:
                    ratios[f"{engine}_b{b}"] = base.p50_ms / lat.p50_ms
        for key in ("params", "size_bytes", "macs"):
            mine = getattr(other, key)
            ratios[key] = getattr(ref, key) / mine if mine else math.inf
        out[other.name] = ratios
    return out


def profile_report(profiles: Sequence[ModelProfile]) -> dict[str, Any]:
    """The JSON document ``distill profile --out`` writes."""
    first = profiles[0]
    versions = {"torch": torch.__version__}
    if any("onnxruntime" in p.latency for p in profiles):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return {
        "threads": first.threads,
        "device": first.device,
        "batch": first.batch,
        "input_shape": list(first.input_shape),
        "memory_method": MEMORY_METHOD_CUDA if first.device.startswith("cuda") else MEMORY_METHOD_CPU,
        "macs_method": "torch.utils.flop_counter.FlopCounterMode FLOPs / 2 at batch 1 (matmul and conv only)",
        "versions": versions,
        "models": [p.to_dict() for p in profiles],
        "speedup_vs_first": compare_profiles(profiles),
    }


# ------------------------------------------------------------------------------ the command
def profile_source(source, roles: Sequence[str] | None = None, **kwargs: Any) -> list[ModelProfile]:
    """Profile a :class:`~distill.finished_run.FinishedRun` (teacher then student) or a
    :class:`~distill.finished_run.NamedModel`; ``kwargs`` go to :func:`profile_model`."""
    from distill.finished_run import FinishedRun

    if isinstance(source, FinishedRun):
        recipe = source.recipe
        pairs = [(f"teacher ({recipe.teacher.model})", source.teacher()),
                 (f"student ({recipe.student.model})", source.student())]
        profiles = []
        for name, model in pairs:  # each model on a real input of its own (its own tokens, for text)
            example = source.task.profile_input(model, source.prepared)
            if example is None:
                raise DistillError(f"task '{source.task.name}' gives no model input to profile its models on")
            first = next(iter(example.values())) if isinstance(example, dict) else example
            profiles.append(profile_model(model, tuple(first.shape[1:]), name=name, example=example, **kwargs))
        if getattr(recipe.teacher, "ensemble", None) is not None:
            profiles[0].notes.append("the teacher is an ensemble: only its main model was profiled")
        return profiles
    return [profile_model(source.build(), source.input_shape, name=source.name, **kwargs)]


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def profile_rows(profiles: Sequence[ModelProfile]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: one row per measure, one column per model, then
    the first model's figure divided by each other's (the speed-up, for latencies)."""
    ratios = compare_profiles(profiles)
    header = ["measure", *[p.name for p in profiles]]
    header += [f"{profiles[0].name} / {p.name}" for p in profiles[1:]]

    def row(label: str, fmt, key: str | None, value_of) -> list[str]:
        cells = [label, *[fmt(value_of(p)) if value_of(p) is not None else "–" for p in profiles]]
        for p in profiles[1:]:
            r = ratios[p.name].get(key) if key else None
            cells.append(f"{r:.2f}×" if r is not None else "–")
        return cells

    rows = [
        row("params", lambda v: f"{v:,}", "params", lambda p: p.params),
        row("size (safetensors)", _bytes, "size_bytes", lambda p: p.size_bytes),
        row("MACs per sample", _count, "macs", lambda p: p.macs),
    ]
    for b in sorted(profiles[0].peak_memory_bytes):
        rows.append(row(f"peak memory, batch {b}", _bytes, None, lambda p, b=b: p.peak_memory_bytes.get(b)))
    engines = list(dict.fromkeys(e for p in profiles for e in p.latency))
    for engine in engines:
        for b in sorted(profiles[0].latency.get(engine, {})):
            for stat in ("p50", "p95"):
                key = f"{engine}_b{b}" if stat == "p50" else None
                rows.append(row(
                    f"{engine} {stat} ms, batch {b}", lambda v: f"{v:.3f}", key,
                    lambda p, e=engine, b=b, s=stat: getattr(p.latency[e][b], f"{s}_ms") if b in p.latency.get(e, {}) else None,
                ))
    return header, rows
