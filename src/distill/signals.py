"""Where the teacher's knowledge comes from.

A teacher signal answers one question: for this batch, what are the teacher's logits and tapped
features? The live teacher runs a model; a cache on disk and an ensemble answer the same way, so
losses never know which one they got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from distill.errors import DistillError
from distill.taps import Head, Taps

Batch = dict[str, Any]
Feed = Callable[[nn.Module, Batch], Any]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_feed(model: nn.Module, batch: Batch) -> Any:
    """Classification feed: ``model(batch["input"])``."""
    return model(batch["input"])


def move_batch(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """Tensors of ``batch`` on ``device``; floating tensors also cast to ``dtype`` when given."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a clear error."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DistillError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda', 'cuda:1'") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise DistillError(f"device {device!r} is not available here ({count} CUDA device(s))")
    elif parsed.type not in ("cpu", "meta") and not getattr(torch, parsed.type, None):
        raise DistillError(f"device {device!r} is not available here")
    return parsed


@runtime_checkable
class TeacherSignal(Protocol):
    """The teacher's outputs for a batch: ``{"logits": [B, C], tap: tensor, ...}`` in fp32."""

    def outputs(self, batch: Batch, taps: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def validate_taps(self, taps: Sequence[str]) -> None: ...


def _detached(value, device: torch.device):
    """A teacher output without its graph, in fp32 on ``device`` (an output head: its hidden states
    so, its layer's weight and bias detached, in their own dtype: the fused losses read them in fp32)."""
    if isinstance(value, Head):
        return Head(value.hidden.detach().to(device, torch.float32), value.weight.detach().to(device),
                    None if value.bias is None else value.bias.detach().to(device))
    return value.detach().to(device, torch.float32)


class LiveTeacher:
    """Runs a teacher model on each batch, in eval mode and without gradients.

    ``precision`` (``fp32``, ``bf16``, ``fp16``) casts the teacher's weights and inputs, which halves
    its memory and, on hardware that supports it, its time; outputs come back in fp32. ``device``
    puts the teacher on another device than the student (``None`` follows the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        feed: Feed = default_feed,
    ) -> None:
        if precision not in _DTYPES:
            raise DistillError(f"unknown teacher precision '{precision}'; use fp32, bf16 or fp16")
        self.model = model
        self.dtype = _DTYPES[precision]
        self.device = parse_device(device) if device is not None else None
        self.feed = feed
        self.model.requires_grad_(False)
        self.model.eval()
        if self.dtype != torch.float32:
            self.model.to(self.dtype)
        if self.device is not None:
            self.model.to(self.device)
        self._taps: dict[tuple[str, ...], Taps] = {}

    def validate_taps(self, taps: Sequence[str]) -> None:
        self._get_taps(taps)

    def _get_taps(self, taps: Sequence[str]) -> Taps:
        key = tuple(taps)
        if key not in self._taps:
            self._taps[key] = Taps(self.model, key, owner="teacher")
        return self._taps[key]

    def _model_device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        if self.model.training:  # someone called .train() on it: a teacher never trains
            self.model.eval()
        out_device = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
        device = self.device or out_device
        if self._model_device() != device:
            self.model.to(device)
        dtype = self.dtype if self.dtype != torch.float32 else None
        fed = move_batch(batch, device, dtype)
        captured = self._get_taps(taps).run(self.feed, self.model, fed)
        return {k: _detached(v, out_device) for k, v in captured.items()}
