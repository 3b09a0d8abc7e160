"""A training stage, built in one place.

A stage is one model trained with one objective: the teacher, the student alone (baseline), a
teacher assistant, a born-again generation, or the distilled student. ``distill run``, ``check``,
``cache``, ``sweep`` and ``ladder`` build every stage here, so they cannot disagree about a recipe:
the same terms, the same batch transforms (the recipe's, then the task's, e.g. on-policy
generation), the same teacher signal (live, or the cache) and the same schedule::

    stage = build_stage(recipe, task, prepared, name="student-seed0", student=model,
                        teacher=signal, spec=recipe.distill, seed=0)
    stage.check()                         # one batch through every term; raises on any problem
    student, history = stage.fit(run_dir=..., resume=...)

The task is used only through its interface (:class:`distill.tasks.base.Task`): its loader, its
feed, its batch transform, its validation metrics and its primary metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.batch_transforms import compose, mixup_transform, shift_transform
from distill.errors import DistillError
from distill.objective import Distiller, DryRunReport, Term, tap_names
from distill.train_config import TrainConfig


# ------------------------------------------------------------------------------ recipe → parts
def terms_from(stage_spec) -> list[Term]:
    """The objective's terms of a recipe stage (``baseline``, ``distill``): built from their specs."""
    return [Term(**term.model_dump()) for term in stage_spec.terms]


def stage_schedule(recipe, stage_spec) -> TrainConfig:
    """The schedule a stage trains with: its own ``train:`` (merged over the recipe's ``train:``
    when the recipe is loaded), else the recipe's ``train:``."""
    return (stage_spec.train if stage_spec is not None and stage_spec.train is not None else recipe.train)


def train_config(spec: TrainConfig, seed: int, progress: bool, primary_metric: str = "accuracy") -> TrainConfig:
    """``spec`` for one seed: early stopping and ``restore_best`` follow the task's primary metric
    unless the recipe names another ``monitor``."""
    return spec.model_copy(update={"seed": seed, "progress": progress,
                                   "monitor": spec.monitor or f"val_{primary_metric}"})


def stage_transforms(recipe, stage_spec) -> list:
    """The recipe's per-step batch transforms of a stage: 1-D shifts, then function-matching mixup."""
    shift = recipe.data.augment.shift
    parts = [shift_transform(shift) if shift else None,
             mixup_transform(stage_spec.mixup_alpha) if stage_spec is not None and stage_spec.mixup_alpha else None]
    return [p for p in parts if p is not None]


def check_runnable(recipe, task) -> None:
    """Refuse, before any work, what no stage of ``recipe`` can run (``run`` and ``check`` alike)."""
    from distill.losses import get_loss

    stage = recipe.distill
    if stage.mixup_alpha is not None:
        readers = [t.name for t in stage.terms if "labels" in get_loss(t.loss).inputs]
        if readers:
            raise DistillError(
                f"distill.mixup_alpha is set, but terms {', '.join(readers)} read labels, which do "
                "not describe mixed inputs; drop them (function matching uses teacher targets only)"
            )
    if recipe.data.labelled is not None:
        if not getattr(task, "supports_transfer_set", False):
            raise DistillError(f"data.labelled (an unlabelled transfer set) is not available for task '{task.name}'")
        readers = [t.name for t in stage.terms if "labels" in get_loss(t.loss).inputs and t.loss != "ce"]
        if readers:
            raise DistillError(
                f"data.labelled leaves most samples without a label, but terms {', '.join(readers)} read one "
                "for every sample; use ce for the labels and teacher terms (kd, ...) for the transfer set"
            )
    if recipe.teacher.cache is None:
        return
    if not task.supports_cache:
        raise DistillError(f"teacher.cache is not available for task '{task.name}'; use the live teacher")
    if task.teacher_cache == "tokens":
        return  # text: no augmentation to replay; the task refuses what rewrites batches (on-policy text)
    if recipe.data.augment.shift or recipe.distill.mixup_alpha:
        raise DistillError(
            "teacher.cache cannot serve data.augment.shift or distill.mixup_alpha: those change the "
            "inputs after the teacher saw them; drop them or use the live teacher"
        )
    augmenting = recipe.data.augment.crop_padding or recipe.data.augment.flip
    if augmenting and recipe.data.views is None:
        raise DistillError(
            "teacher.cache with crop/flip augmentation needs data.views (e.g. 10): the student "
            "must replay the augmented views the teacher saw"
        )


# ------------------------------------------------------------------------------ teacher signal
def teacher_taps(recipe) -> list[str]:
    """The teacher taps the distill stage reads (what a cache must hold besides logits)."""
    from distill.losses import get_loss

    return list(dict.fromkeys(
        name for t in recipe.distill.terms if get_loss(t.loss).needs_teacher
        for name in tap_names(t.teacher) if name != "logits"
    ))


def cache_loader(recipe, task, prepared):
    """The loader a cache is built over and checked against: the student's, first seed."""
    return task.train_loader(recipe, prepared, stage_schedule(recipe, recipe.distill).batch_size, recipe.seeds[0])


def make_cache(recipe, task, teacher: nn.Module, prepared, path: str | Path) -> Path:
    """Run ``teacher`` once over the training set (every replayed view, or every example and token)
    and store its outputs: :mod:`distill.cache` for image samples, :mod:`distill.token_cache` for text
    (or, for sequence-level KD, the text the teacher writes)."""
    if not task.supports_cache:
        raise DistillError(f"a teacher cache is not available for task '{task.name}'; use the live teacher")
    kind = task.cache_kind(recipe)
    if kind == "sequences":
        from distill.token_cache import build_sequence_cache

        inputs, targets = task.cache_sequences(recipe, prepared, teacher)
        return build_sequence_cache(inputs, targets, path, fingerprint=_token_fingerprint(recipe, task, teacher, prepared))
    if kind == "tokens":
        from distill.token_cache import build_token_cache

        batch_size = stage_schedule(recipe, recipe.distill).batch_size
        return build_token_cache(
            teacher, lambda: task.cache_batches(recipe, prepared, batch_size), path,
            num_samples=task.cache_size(prepared), token_mask=task.cache_token_mask(teacher),
            fingerprint=_token_fingerprint(recipe, task, teacher, prepared), taps=teacher_taps(recipe),
            topk=recipe.teacher.cache_topk, dtype=recipe.teacher.cache_dtype, feed=task.feed,
        )
    from distill.cache import build_cache

    return build_cache(
        teacher, cache_loader(recipe, task, prepared), path, taps=teacher_taps(recipe),
        topk=recipe.teacher.cache_topk, dtype=recipe.teacher.cache_dtype,
    )


def _token_fingerprint(recipe, task, teacher: nn.Module, prepared) -> dict:
    from distill.token_cache import token_fingerprint

    parts = task.cache_fingerprint(recipe, prepared, teacher)
    return token_fingerprint(teacher, data=parts["data"], tokenizer=parts["tokenizer"], vocab=parts["vocab"],
                             samples=task.cache_size(prepared), extra=parts.get("extra"))


def open_cache(recipe, task, teacher: nn.Module, prepared, path: str | Path):
    """The cache at ``path``, refused unless it was made by this teacher on this data and transforms
    (and, for text, this tokenizer and vocabulary)."""
    if not Path(path).exists():
        raise DistillError(f"teacher cache {path} does not exist; build it with `distill cache RECIPE --out {path}`")
    kind = task.cache_kind(recipe)
    if kind == "sequences":
        from distill.token_cache import SequenceCache, TeacherText

        stored = SequenceCache(path, expect_fingerprint=_token_fingerprint(recipe, task, teacher, prepared))
        return TeacherText(live_signal(recipe, task, teacher), stored)
    if kind == "tokens":
        from distill.token_cache import TokenCache

        return TokenCache(path, token_mask=task.cache_token_mask(teacher),
                          expect_fingerprint=_token_fingerprint(recipe, task, teacher, prepared))
    from distill.cache import TeacherCache, fingerprint

    return TeacherCache(path, expect_fingerprint=fingerprint(teacher, cache_loader(recipe, task, prepared)))


def live_signal(recipe, task, teacher: nn.Module):
    """The teacher run live on each batch, at the recipe's precision and device."""
    from distill.signals import LiveTeacher

    return LiveTeacher(teacher, precision=recipe.teacher.precision, device=recipe.teacher.device,
                       feed=task.training_feed(recipe))


def check_signal(recipe, task, teacher: nn.Module, prepared):
    """The signal ``distill check`` dry-runs with: the recipe's cache when it exists already (its
    fingerprint is checked), else the live teacher (a cache still to build has the same outputs)."""
    path = recipe.teacher.cache
    if path is not None and path != "auto" and Path(path).exists():
        return open_cache(recipe, task, teacher, prepared, path)
    return live_signal(recipe, task, teacher)


def teacher_signal(recipe, task, teacher: nn.Module, prepared):
    """What teaches the distilled student: the cache at ``teacher.cache`` when the recipe names
    one, else the live teacher."""
    path = recipe.teacher.cache
    if path is None:
        return live_signal(recipe, task, teacher)
    return open_cache(recipe, task, teacher, prepared, path)


# ------------------------------------------------------------------------------ the stage
@dataclass
class Stage:
    """One model, its objective, its batches and its schedule, ready to check or train."""

    name: str
    distiller: nn.Module  # a Distiller, or a MutualLearner of peers
    loader: Any
    transforms: tuple  # per-step (batch, generator) -> batch, applied in order
    config: TrainConfig
    evaluate: Any = None  # student -> validation metrics after each epoch, or None
    stopped_early: bool = False

    @property
    def transform(self):
        """The stage's transforms as one (``None`` when there is none)."""
        return compose(*self.transforms)

    def first_batch(self) -> dict:
        """The first training batch as the trainer would see it (transforms applied)."""
        batch = next(iter(self.loader))
        return self.transform(batch, torch.Generator().manual_seed(0)) if self.transform else batch

    def dry_run(self) -> DryRunReport:
        """One batch through every term: taps, adapters, values, problems (nothing is trained)."""
        return self.distiller.dry_run(self.first_batch())

    def check(self) -> DryRunReport:
        """:meth:`dry_run`, raising a :class:`DistillError` that lists every problem."""
        report = self.dry_run()
        if report.problems:
            raise DistillError(f"{self.name}: " + "; ".join(report.problems))
        return report

    def fit(self, *, run_dir: str | Path | None = None, resume: bool = False, console=None,
            on_epoch_end=None, check: bool = True, label: str | None = None) -> tuple[nn.Module, list[dict[str, float]]]:
        """Check, then train; returns the bare student and the per-epoch metrics. ``label`` is what
        the progress display calls the stage (default: its name)."""
        from distill.trainer import Trainer

        if check:
            self.check()
        evaluate = None
        if self.evaluate is not None:
            def evaluate(model: nn.Module) -> dict[str, float]:
                return self.evaluate(model.student)

        trainer = Trainer(
            self.distiller, self.loader, self.config, evaluate=evaluate, run_dir=run_dir,
            name=self.name, batch_transform=self.transform, console=console, on_epoch_end=on_epoch_end, label=label,
        )
        history = trainer.fit(resume=resume)
        self.stopped_early = bool(getattr(trainer, "stopped_early", False))
        return self.distiller.export_student(), history


def assemble_stage(
    name: str, student: nn.Module, teacher: Any, terms: list[Term], *, feed, loader, config: TrainConfig,
    transforms=(), evaluate=None, peers: list[nn.Module] | None = None, num_samples: int | None = None,
) -> Stage:
    """A :class:`Stage` from its parts (the Python API's way in; :func:`build_stage` reads a recipe):
    ``student`` taught by ``teacher`` (a signal, a model, or ``None``) with ``terms``, or ``peers``
    teaching each other (mutual learning)."""
    if peers:
        from distill.mutual import MutualLearner

        distiller = MutualLearner([student, *peers], terms, feed=feed, num_samples=num_samples)
    else:
        distiller = Distiller(student, teacher, terms, feed=feed, num_samples=num_samples)
    return Stage(name, distiller, loader, tuple(t for t in transforms if t is not None), config, evaluate)


def build_stage(
    recipe, task, prepared, *, name: str, student: nn.Module, teacher: Any, spec, seed: int,
    progress: bool = False, peers: list[nn.Module] | None = None, schedule: TrainConfig | None = None,
) -> Stage:
    """The stage ``name`` of ``recipe``: ``student`` trained with the terms of ``spec`` (a recipe
    stage such as ``recipe.distill``), taught by ``teacher`` (a signal, a model, or ``None``), with
    ``peers`` for mutual learning, on the task's loader and transforms, for ``seed``; validated
    each epoch on the task's validation split when there is one."""
    plan = schedule or stage_schedule(recipe, spec)
    from distill.losses import get_loss

    # a stage that reads no teacher (the teacher, the student alone) cannot use unlabelled samples
    labelled_only = not any(get_loss(t.loss).needs_teacher for t in spec.terms)
    loader = task.train_loader(recipe, prepared, plan.batch_size, seed, labelled_only=labelled_only)
    evaluate = None
    if getattr(prepared, "val_loader", None) is not None:
        def evaluate(model: nn.Module) -> dict[str, float]:
            return task.evaluate(model, prepared, None, split="val")

    return assemble_stage(
        name, student, teacher, terms_from(spec), feed=task.training_feed(recipe),
        loader=loader,
        config=train_config(plan, seed, progress, task.primary_metric),
        transforms=(*stage_transforms(recipe, spec), task.batch_transform(recipe, prepared, student, teacher)),
        evaluate=evaluate, peers=peers, num_samples=getattr(loader, "num_samples", len(prepared.train)),
    )
