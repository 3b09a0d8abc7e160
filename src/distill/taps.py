"""Capture intermediate outputs of any ``nn.Module`` by dotted path, without changing it.

    taps = Taps(model, ["layer3", "blocks.2.attn"])
    with taps:
        logits = model(x)
    feats = taps.outputs          # {"layer3": tensor, "blocks.2.attn": tensor}

A path may end in ``:input`` to capture the first positional input of that module instead of its
output (``fc:input`` is the pre-logit feature of most classifiers). The special name
``logits`` is never a tap: it is the model's own output, added by :meth:`Taps.run`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from distill.errors import DistillError, nearest

LOGITS = "logits"


class Head(NamedTuple):
    """A model's final hidden states and its output layer: its logits are ``hidden @ weight.T + bias``.

    ``hidden``: ``[B, T, H]`` (any leading shape ``[..., H]``); ``weight``: ``[V, H]`` (rows beyond the
    real vocabulary allowed); ``bias``: ``[V]`` or ``None``. A model fed so that it stops before its
    output layer (a causal LM's ``task_options.fused_head``) gives this as its ``logits``, and the
    token losses then compute the logits chunk by chunk (:mod:`distill.losses.fused_head`).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def parse_tap(path: str) -> tuple[str, str]:
    """``"layer3"`` -> ``("layer3", "output")``; ``"fc:input"`` -> ``("fc", "input")``."""
    module, _, kind = path.partition(":")
    kind = kind or "output"
    if kind not in ("output", "input"):
        raise DistillError(f"tap '{path}': the part after ':' must be 'input' or 'output'")
    return module, kind


def module_names(model: nn.Module) -> list[str]:
    """Every dotted submodule path of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, path: str, owner: str = "model") -> nn.Module:
    """The submodule at ``path``; an unknown path raises an error naming the nearest real ones."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        near = nearest(path, module_names(model), n=3)
        hint = f"; nearest: {', '.join(near)}" if near else ""
        raise DistillError(f"unknown tap '{path}' on {owner}{hint}") from None


def _first_tensor(value: Any) -> torch.Tensor:
    """The tensor a hook captured: the value itself, element 0 of a tuple, or a HF output's first."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    raise DistillError(f"tap captured a {type(value).__name__}, not a tensor")


def output_tensor(value: Any) -> torch.Tensor | Head:
    """The logits of a model output: a tensor, a tuple's first tensor, or ``.logits`` (a
    :class:`Head` passes as it is: the logits it stands for are never built)."""
    if isinstance(value, Head):
        return value
    if hasattr(value, "logits") and isinstance(value.logits, torch.Tensor):
        return value.logits
    return _first_tensor(value)


class Taps:
    """Forward hooks on named submodules that store what passes through them.

    Hooks are installed on ``__enter__`` and removed on ``__exit__``; between, every forward pass
    overwrites :attr:`outputs`. Captured tensors keep their autograd graph, so losses on them train
    the model they came from.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], owner: str = "model") -> None:
        self.model = model
        self.paths = [p for p in dict.fromkeys(paths) if p != LOGITS]
        self.owner = owner
        self._targets = {}
        for path in self.paths:
            module_path, kind = parse_tap(path)
            self._targets[path] = (resolve_module(model, module_path, owner), kind)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "Taps":
        self.outputs = {}
        for path, (module, kind) in self._targets.items():
            if kind == "input":
                hook = module.register_forward_pre_hook(self._make_input_hook(path))
            else:
                hook = module.register_forward_hook(self._make_output_hook(path))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_output_hook(self, path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[path] = _first_tensor(output)

        return hook

    def _make_input_hook(self, path: str):
        def hook(_module: nn.Module, inputs: Any) -> None:
            self.outputs[path] = _first_tensor(inputs)

        return hook

    def run(self, forward, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Call ``forward(*args, **kwargs)`` with hooks on; return taps plus ``"logits"``."""
        with self:
            out = forward(*args, **kwargs)
        captured = dict(self.outputs)
        missing = [p for p in self.paths if p not in captured]
        if missing:
            raise DistillError(
                f"taps {missing} on {self.owner} captured nothing: those modules did not run "
                "in the forward pass"
            )
        captured[LOGITS] = output_tensor(out)
        return captured
