"""The objective: loss terms as data, and the module that trains a student against a teacher.

    distiller = Distiller(student, teacher, terms=[
        Term("hard", "ce", weight=0.1),
        Term("soft", "kd", weight=0.9, params={"temperature": 4.0}),
        Term("hint", "hint", student="layer2", teacher="layer3", weight=1.0),
    ])
    distiller.dry_run(batch)             # creates adapters from the shapes it sees
    out = distiller(batch)               # out.loss, out.terms {"hard": ..., "soft": ..., "hint": ...}

The hard-label weight and the soft-target weight are plain terms: nothing is special about them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.adapters import make_adapter
from distill.errors import DistillError
from distill.losses import get_loss
from distill.losses.registry import FUSED
from distill.signals import Batch, Feed, LiveTeacher, TeacherSignal, default_feed
from distill.taps import LOGITS, Head, Taps


@dataclass
class Term:
    """One weighted loss term.

    ``student`` and ``teacher`` are tap names (``"logits"`` is each model's output), or lists of tap
    names for methods that read several layers (FSP, ReviewKD); ``teacher`` is ignored by losses
    that read labels. ``adapter`` chooses the adapter kind for losses that adapt.
    ``warmup_epochs`` ramps the weight linearly from 0 over that many epochs (DKD uses 20), reading
    the progress the trainer reports through :meth:`Distiller.set_progress`.
    """

    name: str
    loss: str
    weight: float = 1.0
    student: str | list[str] = LOGITS
    teacher: str | list[str] = LOGITS
    params: dict[str, Any] = field(default_factory=dict)
    adapter: str = "auto"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise DistillError(f"term name {self.name!r} must be non-empty and contain no '.'")
        for side in ("student", "teacher"):
            value = getattr(self, side)
            if isinstance(value, (list, tuple)):
                if not value or not all(isinstance(v, str) for v in value):
                    raise DistillError(f"term '{self.name}': {side} must be a tap name or a non-empty list of them")
                setattr(self, side, list(value))
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise DistillError(f"term '{self.name}': warmup_epochs must be >= 0, got {self.warmup_epochs}")
        spec = get_loss(self.loss)
        spec.check_params(self.params)
        if not math.isfinite(self.weight):
            raise DistillError(f"term '{self.name}': weight must be finite, got {self.weight}")


@dataclass
class DistillOutput:
    """What one forward pass gives: the total, each weighted term, and the student's tensors."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]


@dataclass
class DryRunReport:
    """Shapes and values from one batch (what ``distill check`` prints)."""

    student_taps: dict[str, tuple[int, ...]]
    teacher_taps: dict[str, tuple[int, ...]]
    adapters: dict[str, str]
    terms: dict[str, float]
    problems: list[str]


def tap_names(value: str | list[str]) -> list[str]:
    """The taps a term side reads: ``"layer3"`` -> ``["layer3"]``; lists are kept."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _pick(outputs: dict[str, torch.Tensor], value: str | list[str]):
    return [outputs[n] for n in value] if isinstance(value, list) else outputs[value]


def _output_shape(value) -> tuple[int, ...]:
    """An output's shape; a top-k teacher (log-probabilities, indices, tail) by its log-probabilities';
    an output head by the logits it stands for."""
    if isinstance(value, Head):
        return (*value.hidden.shape[:-1], value.weight.shape[0])
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value[0].shape)


def _shape(value) -> tuple[int, ...] | list[tuple[int, ...]]:
    return [tuple(v.shape) for v in value] if isinstance(value, list) else tuple(value.shape)


def _as_batch(batch: Any) -> Batch:
    """Accept ``{"input", "target", "index"}`` dicts or ``(input, target[, index])`` tuples."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return dict(zip(("input", "target", "index"), batch))
    raise DistillError(
        "a batch must be a dict with 'input' and 'target', or a tuple (input, target[, index])"
    )


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The token positions a loss with input kind ``"mask"`` scores: ``[B, T]``, aligned with logits.

    ``batch["mask"]`` is used as it is (nonzero: score ``logits[:, t]``). Otherwise
    ``batch["attention_mask"]``, the tokenizer's mask over the *input* tokens (1 = real), is shifted
    for a causal LM, whose ``logits[:, t]`` predict token ``t + 1``: position ``t`` counts when tokens
    ``t`` and ``t + 1`` are both real, so padding (left or right) and each sequence's last position
    are left out, as in next-token cross-entropy. ``None`` (no mask in the batch): every position.
    """
    if batch.get("mask") is not None:
        return batch["mask"]
    attention = batch.get("attention_mask")
    if attention is None:
        return None
    real = attention != 0
    shifted = torch.zeros_like(real)
    shifted[..., :-1] = real[..., :-1] & real[..., 1:]
    return shifted


class Distiller(nn.Module):
    """A student, its adapters and the weighted terms that train it against a teacher signal.

    The teacher is held outside the module tree: it never appears in ``parameters()`` or
    ``state_dict()``, stays in eval mode whatever ``.train()`` is called, and gets no gradients.
    ``teacher`` may be an ``nn.Module`` (wrapped in a :class:`LiveTeacher`), any
    :class:`TeacherSignal`, or ``None`` for a student trained on labels alone.
    ``num_samples`` (the training set's size) is needed by losses with a per-sample memory (CRD).
    ``feed`` calls the student on a batch; ``teacher_feed`` (default: ``feed``) calls a module teacher,
    for teachers that read other inputs, e.g. their own tokenisation (:class:`distill.nlp.TextFeed`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | TeacherSignal | None,
        terms: Sequence[Term],
        feed: Feed = default_feed,
        num_samples: int | None = None,
        teacher_feed: Feed | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise DistillError("an objective needs at least one term")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DistillError(f"term names must be unique; repeated: {', '.join(duplicates)}")
        self.student = student
        self.terms = list(terms)
        self.feed = feed
        self.adapters = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()  # losses with trainable parts or state, built in dry_run
        self.num_samples = num_samples
        self.progress: float | None = None  # epochs done, from the trainer (term warm-ups)
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher, feed=teacher_feed or feed)
        object.__setattr__(self, "teacher", teacher)  # not a submodule, on purpose
        self.specs = {t.name: get_loss(t.loss) for t in self.terms}
        needs_teacher = [t.name for t in self.terms if self.specs[t.name].needs_teacher]
        if needs_teacher and teacher is None:
            raise DistillError(
                f"terms {', '.join(needs_teacher)} need a teacher, but none was given"
            )
        for term in self.terms:
            spec = self.specs[term.name]
            if spec.adapts and (isinstance(term.student, list) or isinstance(term.teacher, list)):
                raise DistillError(f"term '{term.name}' ({term.loss}) adapts one tap to one tap; give single names")
            missing = [n for n in spec.needs if n == "num_samples" and num_samples is None]
            if missing:
                raise DistillError(
                    f"term '{term.name}' ({term.loss}) needs the training set's size: "
                    "Distiller(..., num_samples=len(train_set))"
                )
        self.student_taps = Taps(
            student, [n for t in self.terms for n in tap_names(t.student) if n != LOGITS], owner="student"
        )
        self.teacher_tap_names = list(
            dict.fromkeys(
                n for t in self.terms if self.specs[t.name].needs_teacher
                for n in tap_names(t.teacher) if n != LOGITS
            )
        )
        if self.teacher is not None and self.teacher_tap_names:
            self.teacher.validate_taps(self.teacher_tap_names)
        self._built = not any(self.specs[t.name].adapts or self.specs[t.name].module for t in self.terms)

    def set_progress(self, epochs: float) -> None:
        """Training progress in epochs (fractional), for term warm-ups; the trainer calls this."""
        self.progress = float(epochs)

    def term_weight(self, term: Term) -> float:
        """``term.weight``, ramped linearly over ``term.warmup_epochs`` of reported progress."""
        if term.warmup_epochs <= 0 or self.progress is None:
            return term.weight
        return term.weight * min(1.0, self.progress / term.warmup_epochs)

    # -- training-mode guard -------------------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        model = getattr(self.teacher, "model", None)
        if isinstance(model, nn.Module):
            model.eval()
        return self

    # -- forward ---------------------------------------------------------------------------
    def _teacher_outputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.teacher is None or not any(s.needs_teacher for s in self.specs.values()):
            return {}
        return self.teacher.outputs(batch, self.teacher_tap_names)

    def _inputs(self, term: Term, student: dict, teacher: dict, batch: Batch) -> list[torch.Tensor]:
        spec = self.specs[term.name]
        args = []
        for kind in spec.inputs:
            if kind == "student":
                value = _pick(student, term.student)
                if spec.adapts:
                    value = self.adapters[term.name](value)
                args.append(value)
            elif kind == "teacher":
                args.append(_pick(teacher, term.teacher))
            elif kind == "labels":
                if batch.get("target") is None:
                    raise DistillError(f"term '{term.name}' needs labels, but the batch has none")
                args.append(batch["target"])
            elif kind == "index":
                if batch.get("index") is None:
                    raise DistillError(f"term '{term.name}' needs sample indices, but the batch has no 'index'")
                args.append(batch["index"])
            elif kind == "mask":
                args.append(token_mask(batch))
        return args

    def forward(self, batch: Any) -> DistillOutput:
        batch = _as_batch(batch)
        if not self._built:
            raise DistillError(
                "call distiller.dry_run(batch) once before training: adapters are created from "
                "the shapes it sees, and must exist before the optimizer is built"
            )
        student = self.student_taps.run(self.feed, self.student, batch)
        teacher = self._teacher_outputs(batch)
        parts: dict[str, torch.Tensor] = {}
        total = None
        for term in self.terms:
            spec = self.specs[term.name]
            fn = self.loss_modules[term.name] if spec.module else spec.fn
            args = self._inputs(term, student, teacher, batch)
            if any(isinstance(a, Head) for a in args):  # the models stopped before their output layers
                fn = FUSED.get(term.loss)
                if fn is None or spec.module:
                    raise DistillError(
                        f"term '{term.name}' ({term.loss}) reads logits, but the models give their output heads "
                        f"(fused_head); only the token losses take heads: {', '.join(sorted(FUSED))}"
                    )
            try:
                value = fn(*args, **({} if spec.module else term.params))
            except (ValueError, TypeError, IndexError) as exc:  # shapes, parameter types, label ranges
                raise DistillError(f"term '{term.name}' ({term.loss}): {exc}") from None
            parts[term.name] = value
            weighted = self.term_weight(term) * value
            total = weighted if total is None else total + weighted
        return DistillOutput(loss=total, terms=parts, student=student, teacher=teacher)

    # -- dry run ---------------------------------------------------------------------------
    @torch.no_grad()
    def _build_adapters(self, batch: Batch) -> dict[str, str]:
        student = self.student_taps.run(self.feed, self.student, batch)
        teacher = self._teacher_outputs(batch)
        described = {}
        logits = student[LOGITS]
        device = (logits.hidden if isinstance(logits, Head) else logits).device
        for term in self.terms:
            spec = self.specs[term.name]
            if spec.module and term.name not in self.loss_modules:
                s_shape = _shape(_pick(student, term.student))
                t_shape = _shape(_pick(teacher, term.teacher)) if spec.needs_teacher else None
                needs = {"num_samples": self.num_samples} if "num_samples" in spec.needs else {}
                try:
                    module = spec.fn(s_shape, t_shape, **term.params, **needs)
                except (ValueError, TypeError) as exc:
                    raise DistillError(f"term '{term.name}' ({term.loss}): {exc}") from None
                self.loss_modules[term.name] = module.to(device)
                described[term.name] = f"{type(module).__name__} {s_shape} -> {t_shape}"
            if not spec.adapts or term.name in self.adapters:
                continue
            s_shape, t_shape = tuple(student[term.student].shape), tuple(teacher[term.teacher].shape)
            adapter = make_adapter(s_shape, t_shape, term.adapter)
            self.adapters[term.name] = adapter.to(student[term.student].device)
            described[term.name] = f"{type(adapter).__name__} {s_shape} -> {t_shape}"
        self._built = True
        return described

    def dry_run(self, batch: Any) -> DryRunReport:
        """Run one batch: create adapters, then check every term is finite and trains the student.

        The student's weights are not changed (gradients are computed and then cleared; batch-norm
        running statistics are restored).
        """
        batch = _as_batch(batch)
        saved_buffers = {k: v.clone() for k, v in self.student.state_dict().items()}
        adapters = self._build_adapters(batch)
        saved_losses = {k: v.clone() for k, v in self.loss_modules.state_dict().items()}
        was_training = self.training
        self.train()
        out = self(batch)
        problems = []
        values = {}
        for term in self.terms:  # a weight of 0 trains nothing; a negative one trains away from the target
            if term.weight == 0:
                problems.append(f"term '{term.name}' has weight 0: it does not train the student; remove it "
                                "or give it a weight > 0")
            elif term.weight < 0:
                problems.append(f"term '{term.name}' has weight {term.weight:g}: a negative weight pushes the "
                                "student away from its target; use a weight > 0")
        for term in self.terms:
            value = out.terms[term.name]
            values[term.name] = float(value.detach())
            if not torch.isfinite(value):
                problems.append(f"term '{term.name}' is {values[term.name]} (not finite)")
            elif term.weight != 0 and abs(values[term.name]) < 1e-12:
                problems.append(
                    f"term '{term.name}' is zero on this batch: the student already equals its "
                    "target, or the two taps are the same tensor"
                )
        params = [p for p in self.student.parameters() if p.requires_grad]
        for term in self.terms:
            value = out.terms[term.name]
            if term.weight == 0 or not value.requires_grad:
                if term.weight != 0:
                    problems.append(f"term '{term.name}' does not depend on the student")
                continue
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norm = sum(float(g.abs().sum()) for g in grads if g is not None)
            if norm < 1e-8 or not math.isfinite(norm):
                problems.append(
                    f"term '{term.name}' gives the student no gradient (norm {norm:g}); "
                    "is the student already equal to its target, or is the tap detached?"
                )
        self.student.load_state_dict(saved_buffers)
        self.loss_modules.load_state_dict(saved_losses)  # e.g. a memory bank the dry run wrote to
        for p in self.parameters():
            p.grad = None
        self.train(was_training)
        return DryRunReport(
            student_taps={k: _output_shape(v) for k, v in out.student.items()},
            teacher_taps={k: _output_shape(v) for k, v in out.teacher.items()},
            adapters=adapters,
            terms=values,
            problems=problems,
        )

    # -- export ----------------------------------------------------------------------------
    def export_student(self) -> nn.Module:
        """The bare student, without adapters or teacher."""
        return self.student
