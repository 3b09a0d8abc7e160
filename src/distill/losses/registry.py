"""Losses by name.

Every loss is a pure function of tensors with a documented reduction. The registry records what
each loss reads, so the objective can feed it without knowing the method:

- ``inputs=("student", "teacher")``: a student tensor and the teacher tensor it should match;
- ``inputs=("student", "labels")``: a student tensor and the ground-truth labels;
- ``"index"``: the batch's sample indices; ``"mask"``: which token positions to score, ``[B, T]``
  aligned with the logits, or ``None`` when the batch has no mask (see ``objective.token_mask``);
- ``adapts=True``: the student tensor goes through a trainable adapter to the teacher's shape first;
- ``module=True``: the loss has trainable parts or state (VID's variances, CRD's embeddings and
  memory bank, ReviewKD's fusion blocks). It is then an ``nn.Module`` class constructed as
  ``cls(student_shape, teacher_shape, **params)`` from the shapes of the first batch (a list of
  shapes when a term taps several layers), trained with the student and never exported. A class
  that needs facts about the data lists them in ``needs`` (e.g. ``("num_samples",)``): the objective
  passes them as keyword arguments.

A term may tap several layers (``student: [layer1, layer2]``): the loss then receives a list of
tensors for that input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from distill.errors import DistillError
from distill.registry import Registry

INPUT_KINDS = ("student", "teacher", "labels", "index", "mask")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, what it reads, and whether it needs an adapter."""

    name: str
    fn: Callable
    inputs: tuple[str, ...]
    adapts: bool = False
    module: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        """Facts about the data a module loss is constructed with (e.g. ``num_samples``)."""
        return tuple(getattr(self.fn, "needs", ())) if self.module else ()

    @property
    def needs_teacher(self) -> bool:
        return "teacher" in self.inputs

    def param_names(self) -> list[str]:
        """Keyword parameters a recipe may set (everything after the tensor inputs)."""
        if self.module:  # __init__(self, student_shape, teacher_shape, *, params..., needs...)
            sig = inspect.signature(self.fn.__init__)
            names = [n for n in list(sig.parameters)[3:] if n not in self.needs]
        else:
            sig = inspect.signature(self.fn)
            names = list(sig.parameters)[len(self.inputs) :]
        return [n for n in names if sig.parameters[n].kind is inspect.Parameter.KEYWORD_ONLY
                or sig.parameters[n].default is not inspect.Parameter.empty]

    def check_params(self, params: dict) -> None:
        allowed = self.param_names()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise DistillError(
                f"loss '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(allowed) or 'none'}"
            )


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(
    name: str, inputs: tuple[str, ...] = ("student", "teacher"), adapts: bool = False, module: bool = False
):
    """Decorator: register ``fn`` (a function, or an ``nn.Module`` class with ``module=True``) as ``name``."""
    for kind in inputs:
        if kind not in INPUT_KINDS:
            raise ValueError(f"loss input kind {kind!r} not in {INPUT_KINDS}")

    def add(fn: Callable) -> Callable:
        if module and not isinstance(fn, type):
            raise ValueError(f"loss {name!r}: module=True needs an nn.Module class")
        LOSSES.register(name, LossSpec(name=name, fn=fn, inputs=tuple(inputs), adapts=adapts, module=module))
        return fn

    return add


def get_loss(name: str) -> LossSpec:
    return LOSSES.get(name)
