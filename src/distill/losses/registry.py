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

Each loss also says how to check it (``tests/test_loss_contract.py`` runs every registered loss
through the same checks, so a new loss cannot skip them):

- ``example``: ``example(generator) -> dict``, small valid inputs: a value for each input kind the
  loss reads (``"student"``, ``"teacher"``, ...), for each fact in ``needs`` (``"num_samples"``),
  and optionally ``"student_at_match"``, the student that equals its target when that is not simply
  a copy of the teacher (e.g. a student reading fewer taps). The default, :func:`logits_example`,
  fits losses of ``[B, C]`` logits; :func:`shapes_example` draws features of given shapes.
- ``exempt``: ``{property: reason}`` for contract properties that do not hold for this loss, and
  why (see :data:`CONTRACT_PROPERTIES`). A loss that reads no teacher is exempt from
  ``zero_at_match`` without saying so: it has no "student equals teacher" point.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.errors import DistillError
from distill.registry import Registry

INPUT_KINDS = ("student", "teacher", "labels", "index", "mask")

# the properties of the loss contract a loss may be exempt from, with a reason (see register_loss);
# the others (a finite float32 scalar, gradients to the student, bf16 inputs, the objective's dry
# run) hold for every loss
CONTRACT_PROPERTIES = {
    "zero_at_match": "(near) zero when the student equals its teacher, positive on the example",
    "batch_order": "unchanged when the samples of the batch are permuted",
}

Example = Callable[[torch.Generator], dict[str, Any]]


def logits_example(generator: torch.Generator) -> dict[str, Any]:
    """The default example: student and teacher logits ``[8, 6]``, class labels ``[8]``, sample
    indices ``0..7`` of ``num_samples = 8``, no mask. (Logits are scaled by 3 so that the softmaxes
    are far from uniform and far from one-hot.)"""
    batch, classes = 8, 6
    return {
        "student": torch.randn(batch, classes, generator=generator) * 3,
        "teacher": torch.randn(batch, classes, generator=generator) * 3,
        "labels": torch.randint(0, classes, (batch,), generator=generator),
        "index": torch.arange(batch),
        "num_samples": batch,
        "mask": None,
    }


def shapes_example(student: tuple | list[tuple], teacher: tuple | list[tuple] | None = None) -> Example:
    """An example of standard-normal features: ``student`` and ``teacher`` are shapes (with the
    batch dimension), or lists of shapes for losses that read several taps; no ``teacher`` for a
    loss that reads none."""

    def draw(generator: torch.Generator, shape):
        if isinstance(shape, list):
            return [torch.randn(*s, generator=generator) for s in shape]
        return torch.randn(*shape, generator=generator)

    def example(generator: torch.Generator) -> dict[str, Any]:
        out = {"student": draw(generator, student)}
        if teacher is not None:
            out["teacher"] = draw(generator, teacher)
        return out

    return example


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, what it reads, whether it needs an adapter, and how the
    loss contract builds an example for it and which of its properties it is exempt from."""

    name: str
    fn: Callable
    inputs: tuple[str, ...]
    adapts: bool = False
    module: bool = False
    example: Example = logits_example
    exempt: Mapping[str, str] = field(default_factory=dict, hash=False)

    def exemption(self, prop: str) -> str | None:
        """Why contract property ``prop`` does not hold for this loss; ``None`` when it does."""
        if prop == "zero_at_match" and not self.needs_teacher:
            return "reads no teacher: there is no student-equals-teacher point"
        return self.exempt.get(prop)

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


#: loss name -> its form that takes the models' output heads (:class:`distill.taps.Head`) instead of
#: their logits; the objective runs it when a term's logits come as a Head (``fused_head`` feeds)
FUSED: dict[str, Callable] = {}


def register_fused(name: str):
    """Decorator: ``fn`` is loss ``name``'s form on output heads (same inputs and parameters)."""

    def add(fn: Callable) -> Callable:
        if name in FUSED:
            raise ValueError(f"loss {name!r} already has a fused form")
        FUSED[name] = fn
        return fn

    return add


def register_loss(
    name: str,
    inputs: tuple[str, ...] = ("student", "teacher"),
    adapts: bool = False,
    module: bool = False,
    *,
    example: Example = logits_example,
    exempt: Mapping[str, str] | None = None,
):
    """Decorator: register ``fn`` (a function, or an ``nn.Module`` class with ``module=True``) as ``name``.

    ``example`` and ``exempt`` are for the loss contract (see the module docstring).
    """
    for kind in inputs:
        if kind not in INPUT_KINDS:
            raise ValueError(f"loss input kind {kind!r} not in {INPUT_KINDS}")
    exempt = dict(exempt or {})
    for prop, reason in exempt.items():
        if prop not in CONTRACT_PROPERTIES:
            raise ValueError(f"loss {name!r}: no contract property {prop!r}; one of {', '.join(CONTRACT_PROPERTIES)}")
        if not (isinstance(reason, str) and reason.strip()):
            raise ValueError(f"loss {name!r}: say why it is exempt from {prop!r}")

    def add(fn: Callable) -> Callable:
        if module and not isinstance(fn, type):
            raise ValueError(f"loss {name!r}: module=True needs an nn.Module class")
        LOSSES.register(name, LossSpec(name=name, fn=fn, inputs=tuple(inputs), adapts=adapts, module=module,
                                       example=example, exempt=exempt))
        return fn

    return add


def get_loss(name: str) -> LossSpec:
    return LOSSES.get(name)
