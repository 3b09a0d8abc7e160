"""Export the student for deployment, and prove the exported file computes what the model did.

    result = export_run("runs/mnist", "onnx", quantize="int8")
    result.parity.max_abs_diff, result.parity.agreement, result.quantization.accuracy_int8

Formats: ``onnx`` (``torch.onnx.export``, the TorchScript-based exporter, opset 17, dynamic batch
axis; needs the ``onnx`` extra), ``torchscript`` (``torch.jit.trace``) and ``safetensors`` (the
weights alone). Only the student is exported: no teacher, no adapters.

Inputs are one tensor (graph input ``input``, dynamic batch axis), or, for a model fed by keyword
such as a text classifier (a Hugging Face model, a BiLSTM), named tensors: ``input_ids`` and
``attention_mask`` int64 ``[batch, sequence]``, one graph input each with dynamic batch and
sequence axes (TorchScript takes them positionally, in that order). A task gives them through
:meth:`~distill.tasks.base.Task.example_inputs`; a Hugging Face student's own folder is
:func:`distill.nlp.hf.save_pretrained`'s business, not this module's.

The parity check runs the serialised bytes, loaded back the way a user would load them (ONNX
Runtime, ``torch.jit.load``, a fresh model given the weights), on real batches (the run's test
split; random inputs when only a model is given), with a batch of one first so a batch size baked
into the graph is caught. It compares the logits with those of the model the file was made from:
the largest absolute difference must not exceed ``tolerance × max(1, scale)``, where ``scale`` is
the largest absolute logit of the model (float32 rounding grows with the size of the numbers:
an untrained ResNet-110 has logits near 1e7), and top-1 agreement is reported.
A failed check raises :class:`DistillError` and writes nothing; a file that passes is written
atomically.

``quantize="int8"``: dynamic int8 quantisation of the linear layers (weights stored in int8,
activations quantised on the fly): ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``
for TorchScript, ``onnxruntime.quantization.quantize_dynamic`` on ``MatMul``/``Gemm`` for ONNX.
Quantisation changes the logits by design, so the tolerance applies to the file against the model
it serialises (the int8 eager model for TorchScript; for ONNX the fp32 graph is checked before it
is quantised), and the effect of quantisation is reported separately: logit difference and
agreement with the fp32 model, and test accuracy in fp32 and int8 when labelled data is at hand
(``max_accuracy_drop`` turns the accuracy drop into a failure). Dynamic int8 does not cover
convolutions (nor embeddings): the result's ``notes`` say which layers stay fp32 and what share of
the parameters they hold.

Every exported file records what a deployer needs under the key ``distill`` as one JSON object
(:func:`read_metadata` reads it back from any format): ``distill_version``, ``format``,
``quantize``, ``input_shape`` (one sample, no batch axis) and ``input_name`` (for named inputs:
``input_names`` and ``input_axes``), ``output_name`` (the ONNX graph's), and from a run directory
also ``task``, ``recipe`` (its name), ``recipe_sha256`` (of the run's ``recipe.yaml``),
``student_model``, ``seed`` (whose student), ``num_classes`` and, when the data has them,
``normalization`` (``mean``, ``std``, how they are applied) and ``class_names``. ONNX:
``metadata_props`` (``onnxruntime``: ``session.get_modelmeta().custom_metadata_map["distill"]``);
safetensors: the header's ``__metadata__`` (``safe_open(path, "pt").metadata()["distill"]``);
TorchScript: the extra file ``distill.json`` (``torch.jit.load(path, _extra_files={"distill.json":
""})``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.checkpoints import atomic_write
from distill.errors import DistillError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
QUANTIZE = ("int8",)
ONNX_OPSET = 17
DEFAULT_TOLERANCE = 1e-4

#: one input batch: a tensor ``[b, ...]``, or named tensors ``[b, T]`` for a model fed by keyword
#: (``input_ids``, ``attention_mask``: a text model's ``model(**inputs)``)
Inputs = torch.Tensor | dict[str, torch.Tensor]
Runner = Callable[[Inputs], torch.Tensor]


def require_onnx():
    """``(onnx, onnxruntime)``, or an error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise DistillError(
            f"ONNX needs the onnx extra ({exc.name} is not installed): pip install distill[onnx]"
        ) from None
    return onnx, onnxruntime


# ------------------------------------------------------------------------------ inputs
def input_names(x: Inputs) -> list[str]:
    """The graph's input names: ``input`` for one tensor, the keys of named inputs."""
    return list(x) if isinstance(x, dict) else ["input"]


def _args(x: Inputs) -> tuple[torch.Tensor, ...]:
    return tuple(v.cpu() for v in x.values()) if isinstance(x, dict) else (x.cpu(),)


def _rows(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _cpu(x: Inputs) -> Inputs:
    return {k: v.cpu() for k, v in x.items()} if isinstance(x, dict) else x.cpu()


class Positional(nn.Module):
    """``forward(*tensors)`` -> the logits tensor of ``model(**dict(zip(names, tensors)))``: a model
    fed by keyword (a Hugging Face model, whose output is an object with ``logits``) in the shape
    that tracing (ONNX, TorchScript) takes."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from distill.taps import output_tensor

        return output_tensor(self.model(**dict(zip(self.names, args))))


class LogitsOnly(nn.Module):
    """``model`` with a Hugging Face output object (``.logits`` beside a key-value cache, which
    tracing refuses) reduced to its logits; other outputs (a tensor, a dict of heads) pass as they are."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def _traceable(model: nn.Module, example: Inputs) -> nn.Module:
    """:class:`Positional` over the example's names for named inputs, else :class:`LogitsOnly`."""
    return (Positional(model, list(example)) if isinstance(example, dict) else LogitsOnly(model)).eval()


# ------------------------------------------------------------------------------ serialisers
def onnx_bytes(model: nn.Module, example: Inputs) -> bytes:
    """``model`` as an ONNX graph (opset 17), traced on the CPU with ``example``: input ``input``
    and output ``logits`` with a dynamic batch axis or, for named inputs (``input_ids``,
    ``attention_mask`` ``[b, T]``), one graph input per name with dynamic batch and sequence axes
    (and a dynamic sequence axis on per-token logits ``[b, T, V]``)."""
    require_onnx()
    model = _traceable(copy.deepcopy(model).cpu().eval(), example)
    names = input_names(example)
    axes: dict[str, dict[int, str]] = {}
    for name, value in zip(names, _args(example)):
        axes[name] = {0: "batch", 1: "sequence"} if isinstance(example, dict) and value.dim() >= 2 else {0: "batch"}
    axes["logits"] = {0: "batch"}
    if isinstance(example, dict):
        with torch.no_grad():
            if model(*_args(example)).dim() == 3:
                axes["logits"][1] = "sequence"
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        if not isinstance(example, dict):
            # dynamo=False: the torch.export-based exporter needs onnxscript, which the extra lacks
            torch.onnx.export(model, _args(example), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=names, output_names=["logits"], dynamic_axes=axes)
            return buffer.getvalue()
        try:
            with _quiet_stdout():  # on failure the exporter prints its whole graph there
                torch.onnx.export(model, _args(example), buffer, dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=names, output_names=["logits"], dynamic_axes=axes)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; all mean the same here
            inner = model.model
            if hasattr(getattr(inner, "model", None), "save_pretrained"):  # HFModel: name the architecture
                inner = inner.model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hf = hasattr(inner, "save_pretrained")
            raise DistillError(
                f"ONNX export of {type(inner).__name__} failed ({first[:200]}); export it with --format "
                "safetensors or torchscript" + (", or deploy the Hugging Face folder a run saves (stages/"
                                               "student-seed<N>/hf: AutoModelFor*.from_pretrained)" if hf else "")
            ) from None
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 to /dev/null (what native code prints there too), then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnx_session(model: bytes | str | Path, threads: int = 1, device: str = "cpu"):
    """An ONNX Runtime session with ``threads`` intra-op threads (CUDA provider when asked for and
    installed, else the CPU one)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def onnx_quantize_int8(data: bytes) -> bytes:
    """Dynamic int8 quantisation of an ONNX graph's ``MatMul``/``Gemm`` weights (ONNX Runtime)."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="distill-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process applies to static quantisation
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
        return dst.read_bytes()


def torch_quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its ``nn.Linear`` layers dynamically quantised to int8."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # pragma: no cover - a future torch without torch.ao.quantization
        raise DistillError("this torch has no torch.ao.quantization; export int8 with --format onnx") from None
    with warnings.catch_warnings():  # torch announces the move of eager quantisation to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def torchscript_bytes(model: nn.Module, example: Inputs) -> bytes:
    """``model`` traced with ``example`` and saved with ``torch.jit.save``; named inputs become
    positional arguments in their order (``module(input_ids, attention_mask)``)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traceable = _traceable(model.cpu().eval(), example)
        # check_trace off: the parity check below runs the saved file itself; strict off lets a model
        # return a dict of fixed keys (a detection head's boxes and classes), which the check compares
        traced = torch.jit.trace(traceable, _args(example), check_trace=False, strict=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    return save(tensors)


METADATA_KEY = "distill"
TORCHSCRIPT_METADATA = "distill.json"


def with_metadata(fmt: str, data: bytes, metadata: dict[str, Any]) -> bytes:
    """``data`` (a serialised model in ``fmt``) with ``metadata`` recorded under ``distill`` as
    JSON: ONNX ``metadata_props``, the safetensors header's metadata, a TorchScript extra file."""
    text = json.dumps(metadata, sort_keys=True, default=str)
    if fmt == "onnx":
        onnx, _ = require_onnx()
        proto = onnx.load_from_string(data)
        kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        proto.metadata_props.add(key=METADATA_KEY, value=text)
        return proto.SerializeToString()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            buffer = io.BytesIO()
            torch.jit.save(module, buffer, _extra_files={TORCHSCRIPT_METADATA: text})
        return buffer.getvalue()
    from safetensors.torch import load, save

    return save(load(data), metadata={"format": "pt", METADATA_KEY: text})


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``distill`` metadata of an exported file (format from the suffix: ``.onnx``, ``.pt``,
    ``.safetensors``), or ``None`` when it has none."""
    path = Path(path)
    if path.suffix == ".onnx":
        onnx, _ = require_onnx()
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get(METADATA_KEY)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    else:
        extra = {TORCHSCRIPT_METADATA: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[TORCHSCRIPT_METADATA] or None
    return json.loads(text) if text else None


def _serialise(model: nn.Module, fmt: str, example: Inputs) -> bytes:
    if fmt == "onnx":
        return onnx_bytes(model, example)
    if fmt == "torchscript":
        return torchscript_bytes(model, example)
    return safetensors_bytes(model)


def load_exported(fmt: str, data: bytes, rebuild: Callable[[], nn.Module] | None = None) -> Runner:
    """Load serialised bytes back as a user would, as a function ``inputs -> logits`` (CPU)."""
    if fmt == "onnx":
        session = onnx_session(data)
        graph_inputs = [i.name for i in session.get_inputs()]

        def run_onnx(x: Inputs) -> torch.Tensor:
            # the exporter drops inputs the graph does not read (a model may ignore attention_mask)
            given = x if isinstance(x, dict) else {graph_inputs[0]: x}
            outputs = session.run(None, {k: given[k].cpu().numpy() for k in graph_inputs})
            return _compared([torch.from_numpy(o) for o in outputs] if len(outputs) > 1 else torch.from_numpy(outputs[0]))

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        module.eval()

        def run_script(x: Inputs) -> torch.Tensor:
            with torch.inference_mode():
                return _compared(module(*_args(x)))

        return run_script
    else:
        from safetensors.torch import load

        if rebuild is None:
            raise DistillError("loading safetensors back needs the model to load them into")
        module = rebuild().cpu().eval()
        module.load_state_dict(load(data), strict=True)
    return _eager(module)


def _eager(model: nn.Module) -> Runner:
    def run(x: Inputs) -> torch.Tensor:
        with torch.inference_mode():
            return _compared(model(**_cpu(x)) if isinstance(x, dict) else model(x.cpu()))

    return run


def _compared(out) -> torch.Tensor:
    """What the parity check compares of a model's output, ``[batch, ...]`` in fp32: the logits of one
    output (a tensor, a tuple's first, ``.logits``); every head of a plain dict or list of tensors (a
    detector's heatmap, sizes and offsets, in their order), flattened per sample side by side."""
    from distill.taps import output_tensor

    if isinstance(out, dict) and type(out) is dict or isinstance(out, list):
        tensors = list(out.values()) if isinstance(out, dict) else out
        if len(tensors) > 1 and all(isinstance(t, torch.Tensor) for t in tensors):
            return torch.cat([t.float().flatten(1) for t in tensors], dim=1)
    return output_tensor(out).float()


# ------------------------------------------------------------------------------ checks
@dataclass
class Parity:
    """Exported file against the model it was made from, on ``samples`` inputs."""

    reference: str
    samples: int
    max_abs_diff: float
    agreement: float
    tolerance: float
    scale: float  # the largest absolute logit of the reference

    @property
    def allowed(self) -> float:
        return self.tolerance * max(1.0, self.scale)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.allowed


@dataclass
class QuantizationEffect:
    """int8 against the fp32 model: logits on the parity inputs, accuracy on labelled test data."""

    scheme: str
    max_abs_diff: float
    agreement: float
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    test_samples: int | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_fp32 - self.accuracy_int8


@dataclass
class ExportResult:
    path: Path
    format: str
    quantize: str | None
    size_bytes: int
    parity: Parity
    quantization: QuantizationEffect | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # what the file records (see the module)
    notes: list[str] = field(default_factory=list)  # what a user should know, e.g. layers left in fp32

    def to_dict(self) -> dict[str, Any]:
        out = {"path": str(self.path), "format": self.format, "quantize": self.quantize,
               "size_bytes": self.size_bytes,
               "parity": {**asdict(self.parity), "allowed": self.parity.allowed, "passed": self.parity.passed},
               "metadata": self.metadata, "notes": list(self.notes)}
        if self.quantization is not None:
            out["quantization"] = {**asdict(self.quantization), "accuracy_drop": self.quantization.accuracy_drop}
        return out


def _share(count: int, total: int) -> str:
    pct = 100 * count / max(total, 1)
    if 0 < pct < 1:
        return "<1%"
    return ">99%" if 99 < pct < 100 else f"{pct:.0f}%"


def int8_coverage_notes(model: nn.Module, fmt: str) -> list[str]:
    """What dynamic int8 leaves in fp32: it quantises ``nn.Linear`` (ONNX: ``MatMul``/``Gemm``)
    only, so convolutions and embeddings keep their fp32 weights."""
    unique = {id(p): p.numel() for p in model.parameters()}
    total = sum(unique.values())

    def owned(modules: list[nn.Module]) -> int:
        ids = {id(p) for m in modules for p in m.parameters(recurse=False)}
        return sum(unique.get(i, 0) for i in ids)

    notes = []
    for kind, types in (("conv", (nn.modules.conv._ConvNd,)), ("embedding", (nn.Embedding, nn.EmbeddingBag))):
        found = [m for m in model.modules() if isinstance(m, types)]
        if found:
            layers = f"{len(found)} of {len(found)} {kind} layer{'s' if len(found) != 1 else ''}"
            notes.append(f"int8 dynamic quantisation covers nn.Linear only: {layers} stay fp32 "
                         f"({_share(owned(found), total)} of parameters)")
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linear:
        where = " (ONNX: MatMul/Gemm)" if fmt == "onnx" else ""
        notes.append(f"quantised to int8: {len(linear)} nn.Linear layer{'s' if len(linear) != 1 else ''}{where} "
                     f"({_share(owned(linear), total)} of parameters)")
    else:
        notes.append("int8 dynamic quantisation covers nn.Linear only and this model has none: "
                     "the int8 file keeps every weight in fp32")
    return notes


def compare_logits(a: Runner, b: Runner, inputs: Sequence[Inputs]) -> tuple[float, float, int, float]:
    """Largest absolute logit difference, top-1 agreement, sample count of ``a`` vs ``b``, and
    the largest absolute logit of ``b``."""
    worst, agree, count, scale, predictions = 0.0, 0, 0, 0.0, 0
    for x in inputs:
        la, lb = a(x).float(), b(x).float()
        if la.shape != lb.shape:
            raise DistillError(f"exported model gives logits of shape {tuple(la.shape)}, the model {tuple(lb.shape)}")
        worst = max(worst, float((la - lb).abs().max()))
        scale = max(scale, float(lb.abs().max()))
        same = la.argmax(-1) == lb.argmax(-1)  # [b], or [b, T] for per-token logits
        agree += int(same.sum())
        predictions += same.numel()
        count += _rows(x)
    return worst, agree / max(predictions, 1), count, scale


def accuracy_of(run: Runner, batches: Iterable[dict]) -> tuple[float, int]:
    correct = total = 0
    for batch in batches:
        correct += int((run(batch["input"]).argmax(-1) == batch["target"]).sum())
        total += batch["target"].numel()
    return correct / max(total, 1), total


def random_inputs(model: nn.Module, input_shape: Sequence[int], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random inputs ``[n, *input_shape]``: standard normal, or token ids (as float32, the
    way the batch loader hands sequences over) below the vocabulary size when the model starts
    with an embedding."""
    generator = torch.Generator().manual_seed(seed)
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (n, *input_shape), generator=generator).float()
    return torch.randn(n, *input_shape, generator=generator)


def parity_inputs(x: Inputs, batch: int = 64) -> list[Inputs]:
    """``x`` as a batch of one, then batches of ``batch`` (a baked-in batch size fails the first).
    Named inputs with an ``attention_mask`` are cut to each batch's longest row, so the batches
    differ in length too (a baked-in sequence length fails)."""
    if isinstance(x, torch.Tensor):
        return [x[:1], *x[1:].split(batch)] if len(x) > 1 else [x]
    n = _rows(x)
    bounds = [(0, 1), *((s, min(s + batch, n)) for s in range(1, n, batch))] if n > 1 else [(0, n)]
    out = []
    for start, stop in bounds:
        part = {k: v[start:stop] for k, v in x.items()}
        mask = part.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] > 1:
            used = mask.ne(0).any(0).nonzero()
            length = max(1, int(used.max()) + 1) if len(used) else 1
            part = {k: (v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in part.items()}
        out.append(part)
    return out


# ------------------------------------------------------------------------------ export
def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    inputs: Sequence[Inputs],
    *,
    quantize: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    rebuild: Callable[[], nn.Module] | None = None,
    test_batches: Iterable[dict] | None = None,
    max_accuracy_drop: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` in ``fmt`` after the parity check on ``inputs`` (a list of
    input batches ``[b, ...]``, or of dicts of named tensors ``[b, T]`` for a model fed by keyword,
    such as a Hugging Face model's ``input_ids`` and ``attention_mask``; see the module).
    ``rebuild`` makes a fresh model to load exported safetensors into (default: a copy of
    ``model``). ``test_batches`` (``{"input", "target"}`` dicts) measure fp32 and int8 accuracy
    when quantising. ``metadata`` is recorded in the file next to the version, format,
    quantisation and the input shape (that of ``inputs``). Raises :class:`DistillError` when the
    check fails; nothing is written then."""
    if fmt not in FORMATS:
        raise DistillError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise DistillError(f"unknown quantisation '{quantize}'; choose int8")
    if quantize and fmt == "safetensors":
        raise DistillError("int8 export needs --format torchscript or onnx: safetensors holds plain "
                           "tensors, not quantised layers")
    if not inputs:
        raise DistillError("the parity check needs at least one input batch")
    if fmt == "onnx":
        require_onnx()
    model = copy.deepcopy(model).cpu().eval()
    inputs = [_cpu(x) for x in inputs]
    example = inputs[0]
    if isinstance(example, dict):
        # traced on the widest batch: padded rows take the general attention-mask path, which a
        # batch of one without padding might let the model skip
        example = max(inputs, key=_rows)
        shape = {"input_names": input_names(example),
                 "input_axes": {k: ["batch", "sequence"][:v.dim()] + [int(d) for d in v.shape[2:]]
                                for k, v in example.items()}}
    else:
        shape = {"input_shape": list(example.shape[1:]), "input_name": "input"}
    fp32 = _eager(model)
    rebuild = rebuild or (lambda: copy.deepcopy(model))
    meta = {"distill_version": _version(), "format": fmt, "quantize": quantize, **shape, "output_name": "logits",
            **(metadata or {})}

    effect_runner = None
    if quantize and fmt == "torchscript":
        reference_model = torch_quantize_int8(model)
        reference, label = _eager(reference_model), "int8 eager model (torch quantize_dynamic)"
        data = with_metadata(fmt, _serialise(reference_model, fmt, example), meta)
        loaded = effect_runner = load_exported(fmt, data)
    else:
        reference, label = fp32, "fp32 eager model"
        data = with_metadata(fmt, _serialise(model, fmt, example), meta)
        loaded = load_exported(fmt, data, rebuild)
        if quantize:  # onnx: the fp32 graph is checked, then quantised
            label = "fp32 eager model (the ONNX graph before int8 quantisation)"
            data = with_metadata(fmt, onnx_quantize_int8(data), meta)
            effect_runner = load_exported(fmt, data)

    worst, agree, count, scale = compare_logits(loaded, reference, inputs)
    parity = Parity(reference=label, samples=count, max_abs_diff=worst, agreement=agree, tolerance=tolerance,
                    scale=scale)
    if not parity.passed:
        raise DistillError(
            f"parity check failed: the exported {fmt} model's logits differ from the {label}'s by up to "
            f"{worst:.3g} > {parity.allowed:.3g} (tolerance {tolerance:g} x max(1, largest logit {scale:.3g})); "
            f"top-1 agreement {100 * agree:.2f}% on {count} samples; nothing was written. "
            "Raise --tolerance only if that difference is acceptable"
        )

    effect = None
    if quantize:
        q_worst, q_agree, _, _ = compare_logits(effect_runner, fp32, inputs)
        effect = QuantizationEffect(scheme=f"dynamic int8 ({'MatMul/Gemm' if fmt == 'onnx' else 'nn.Linear'})",
                                    max_abs_diff=q_worst, agreement=q_agree)
        if test_batches is not None:
            batches = list(test_batches)
            effect.accuracy_fp32, effect.test_samples = accuracy_of(fp32, batches)
            effect.accuracy_int8, _ = accuracy_of(effect_runner, batches)
            drop = effect.accuracy_drop
            if max_accuracy_drop is not None and drop > max_accuracy_drop:
                raise DistillError(
                    f"int8 accuracy {100 * effect.accuracy_int8:.2f}% is {100 * drop:.2f} points below fp32 "
                    f"({100 * effect.accuracy_fp32:.2f}%), more than --max-accuracy-drop "
                    f"{100 * max_accuracy_drop:.2f}; nothing was written. Export fp32, or quantise fewer layers"
                )
    written = atomic_write(Path(path).expanduser(), lambda f: f.write(data))
    notes = int8_coverage_notes(model, fmt) if quantize else []
    return ExportResult(path=written, format=fmt, quantize=quantize, size_bytes=len(data), parity=parity,
                        quantization=effect, metadata=meta, notes=notes)


def _version() -> str:
    from distill.version import __version__

    return __version__


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_metadata(run) -> dict[str, Any]:
    """What a deployer needs to know about the student of a
    :class:`~distill.finished_run.FinishedRun` (see the module); fields the task's data lacks
    (normalisation, class names) are left out."""
    recipe = run.recipe
    meta: dict[str, Any] = {"task": recipe.task, "recipe": recipe.name,
                            "recipe_sha256": _sha256(run.path / "recipe.yaml"),
                            "student_model": recipe.student.model}
    if recipe.student.kwargs:
        meta["student_kwargs"] = dict(recipe.student.kwargs)
    weights = run.student_weights()
    seed = _seed_of(run, weights)
    if seed is not None:
        meta["seed"] = seed
    meta.update(run.task.deploy_metadata(run.prepared))
    return meta


def _seed_of(run, weights: Path) -> int | None:
    """Whose student ``weights`` is: the seed of the stage it is (or is a copy of)."""
    staged = re.fullmatch(r"student-seed(-?\d+)", weights.parent.name)
    if staged:
        return int(staged.group(1))
    digest = _sha256(weights)
    for seed in run.recipe.seeds:
        stage = run.path / "stages" / f"student-seed{seed}" / "student.safetensors"
        if stage.is_file() and _sha256(stage) == digest:
            return int(seed)
    return None


def default_path(base: Path, name: str, fmt: str, quantize: str | None) -> Path:
    return base / f"{name}{'-' + quantize if quantize else ''}{FORMATS[fmt]}"


def export_source(
    source,
    fmt: str,
    out: str | Path | None = None,
    *,
    quantize: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    samples: int = 256,
    max_accuracy_drop: float | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export the student of a :class:`~distill.finished_run.FinishedRun` (parity on the first
    ``samples`` test inputs, quantised accuracy on the whole test split) or a
    :class:`~distill.finished_run.NamedModel` (parity on ``samples`` random inputs). The default
    ``out`` is ``RUN/export/student[-int8].<ext>``, or ``<model>[-int8].<ext>`` here."""
    from distill.finished_run import FinishedRun

    if samples < 1:
        raise DistillError("--samples must be at least 1")
    if isinstance(source, FinishedRun):
        model, rebuild = source.student(), source.fresh_student
        x = source.example_inputs(samples)
        if x is None:
            x = random_inputs(model, source.input_shape, samples, seed)
        path = Path(out) if out else default_path(source.path / "export", "student", fmt, quantize)
        test_batches = source.labelled_test_batches() if quantize else None
        metadata = run_metadata(source)
    else:
        model = source.build()
        rebuild = lambda: type(source)(source.name, source.input_shape, source.num_classes, None, source.kwargs).build()  # noqa: E731
        x = random_inputs(model, source.input_shape, samples, seed)
        path = Path(out) if out else default_path(Path("."), source.name.replace(":", "_"), fmt, quantize)
        test_batches = None
        metadata = {"model": source.name, "num_classes": source.num_classes}
        if source.kwargs:
            metadata["model_kwargs"] = dict(source.kwargs)
    return export_model(model, path, fmt, parity_inputs(x), quantize=quantize, tolerance=tolerance,
                        rebuild=rebuild, test_batches=test_batches, max_accuracy_drop=max_accuracy_drop,
                        metadata=metadata)
