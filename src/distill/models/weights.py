"""Reading and writing model weights, safely.

Weights are written as safetensors. Reading also accepts PyTorch checkpoints (``.pt``/``.pth``),
but only through ``torch.load(weights_only=True)``: a checkpoint is a pickle, and a full unpickle
runs whatever code the file names. Files that need more than tensors and plain containers are
refused, with a message saying how to re-save them.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from distill.errors import DistillError

# Keys under which training scripts commonly nest the state dict (RepDistiller uses "model").
_NESTING_KEYS = ("state_dict", "model")
_SHOWN = 5  # keys listed per kind of mismatch


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then a JSON object."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _directory_message(path: Path) -> str:
    """Weights given as a folder: say a file is needed, and name the weight files it holds."""
    try:
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    except OSError:
        found = []
    hint = ""
    if found:
        more = f" (and {len(found) - _SHOWN} more)" if len(found) > _SHOWN else ""
        hint = f"; it holds {', '.join(found[:_SHOWN])}{more}, e.g. {path / found[0]}"
    return (f"weights {path} is a directory; give the weights file itself (a .safetensors or .pt file, "
            f"such as a run's teacher.safetensors or student.safetensors){hint}")


SHIPPED = "shipped:"  # ``teacher.weights: shipped:NAME`` names a teacher that comes with distill


def shipped_teachers() -> dict[str, dict]:
    """The teachers that come with distill (``distill/teachers/NAME.json`` manifests, made by
    ``benchmarks/teachers.py``): name -> manifest (file, sha256, model, kwargs, test accuracy, command)."""
    import json
    from importlib import resources

    folder = resources.files("distill") / "teachers"
    if not folder.is_dir():
        return {}
    return {p.name[:-5]: json.loads(p.read_text()) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".json")}


def resolve_weights(path: str | os.PathLike[str]) -> Path:
    """The file of a weights reference: a path, or ``shipped:NAME`` (a teacher that comes with
    distill; its SHA-256 is checked against its manifest)."""
    text = str(path)
    if not text.startswith(SHIPPED):
        return Path(text).expanduser()
    from importlib import resources

    from distill.errors import nearest

    name = text[len(SHIPPED):]
    known = shipped_teachers()
    if name not in known:
        near = nearest(name, list(known)) or list(known)
        raise DistillError(f"no shipped teacher '{name}'; shipped: {', '.join(near)}")
    manifest = known[name]
    file = Path(str(resources.files("distill") / "teachers" / manifest["file"]))
    import hashlib

    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
    if digest != manifest["sha256"]:
        raise DistillError(
            f"shipped teacher '{name}': {file} is {'missing' if digest is None else 'damaged (SHA-256 ' + digest + ')'}, "
            f"expected SHA-256 {manifest['sha256']}; reinstall distill"
        )
    return file


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, as ``{name: tensor}``.

    ``.safetensors`` files are read directly; anything else goes through
    ``torch.load(weights_only=True)``, and a dict holding the state dict under ``"state_dict"``
    or ``"model"`` is unwrapped. ``shipped:NAME`` reads a teacher that comes with distill.
    Raises :class:`DistillError` for a missing or unreadable file.
    """
    path = resolve_weights(path)
    if path.is_dir():
        raise DistillError(_directory_message(path))
    if not path.is_file():
        raise DistillError(f"weights file not found: {path}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise DistillError(f"{path} is not a valid safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found or "unsupported global" in str(err).lower():
            what = f" ({found.group(1)})" if found else ""
            raise DistillError(
                f"refusing to load {path}: it refers to Python objects other than tensors{what}, "
                "and unpickling them could run arbitrary code. If you trust the file, load it "
                "yourself and re-save model.state_dict() with distill.models.save_weights"
            ) from err
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
        detail = reason.group(1).strip() if reason else str(err).splitlines()[0]
        raise DistillError(f"{path} is not a valid PyTorch checkpoint ({detail})") from err
    except Exception as err:  # torch.load raises many types for corrupt or foreign files
        raise DistillError(f"{path} is not a valid PyTorch checkpoint: {err}") from err
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(len(_NESTING_KEYS) + 1):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if isinstance(obj, Mapping):
        keys = ", ".join(str(k) for k in list(obj)[:_SHOWN])
        raise DistillError(
            f"{path} holds a dict (keys: {keys or 'none'}) but no state dict of tensors; "
            f"expected the tensors at the top level or under {' or '.join(_NESTING_KEYS)}"
        )
    raise DistillError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _strip_data_parallel(sd: dict[str, torch.Tensor], expected: Mapping[str, object]) -> dict:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds, when the model lacks it."""
    prefix = "module."
    wrapped = sd and all(k.startswith(prefix) for k in sd)
    if wrapped and not any(k.startswith(prefix) for k in expected):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _listing(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load the weights at ``path`` into ``model`` strictly; returns ``model``.

    Every tensor of the model must be in the file with the same shape and the file must hold
    nothing else (a missing BN ``num_batches_tracked`` counter is tolerated, as PyTorch does).
    On a mismatch nothing is loaded and the :class:`DistillError` names the missing and
    unexpected keys and the shape mismatches.
    """
    sd = read_state_dict(path)
    expected = model.state_dict()
    sd = _strip_data_parallel(sd, expected)
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} (file {list(sd[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes: {_listing(shapes)}")
        raise DistillError(
            f"weights {path} do not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Check that the model name, num_classes and input_shape match the checkpoint"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise DistillError(f"weights {path} do not fit {type(model).__name__}: {err}") from err
    return model


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the weights as safetensors, atomically; returns the path written.

    The file is written next to ``path`` under a temporary name, flushed to disk and then renamed
    over ``path``, so a crash leaves either the old file or the new one, never half of one.
    Tensors are copied to contiguous CPU memory first (safetensors refuses shared storage, which
    tied weights have).
    """
    from safetensors.torch import save

    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DistillError(f"cannot save weights: entries {_listing(bad)} are not tensors")
    tensors = {
        str(k): v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in state.items()
    }
    data = save(tensors, metadata=dict(metadata) if metadata else None)

    from distill.checkpoints import atomic_write

    return atomic_write(Path(path).expanduser(), lambda f: f.write(data))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
