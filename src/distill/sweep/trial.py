"""One trial of ``distill sweep``: :func:`train_trial` trains the distilled student of a recipe and
scores it on the validation split, :class:`EpochReporter` reports each epoch to Optuna (and stops a
pruned trial), ``_objective`` is the Optuna objective, and ``_CONTEXT`` the per-process cache of
prepared data and teacher signals that the trials of one worker share."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError
from distill.sweep.space import Dimension, apply_params


def require_optuna():
    """The ``optuna`` module, or an error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise DistillError("distill sweep needs Optuna: pip install distill[search]") from None
    return optuna



@dataclass
class TrialOutcome:
    """A trained trial: the final student's validation score (the task's primary metric)."""

    score: float
    metric: str
    history: list[dict[str, float]]
    student: torch.nn.Module
    stopped: bool


_CONTEXT: dict[str, Any] = {}  # per process: prepared data and teacher signals, reused by trials


def _prepared(recipe, data_dir):
    """The task's prepared data of ``recipe``, loaded once per process."""
    from distill.tasks.base import get_task

    key = json.dumps([recipe.task, recipe.data.model_dump(mode="json"), str(data_dir)], sort_keys=True)
    if key not in _CONTEXT:
        _CONTEXT[key] = get_task(recipe.task).prepare(recipe, data_dir)
    return _CONTEXT[key]


def _teacher_signal(recipe, task, prepared):
    """The teacher signal of ``recipe`` (live or its cache), built once per process."""
    from distill.stage import teacher_signal

    key = json.dumps(["signal", recipe.task, recipe.teacher.model_dump(mode="json"),
                      recipe.data.model_dump(mode="json")], sort_keys=True)
    if key not in _CONTEXT:
        teacher = task.build_model(recipe.teacher, prepared, recipe.seeds[0])
        _CONTEXT[key] = teacher_signal(recipe, task, teacher, prepared)
    return _CONTEXT[key]


def check_searchable(recipe) -> None:
    """Refuse recipes whose distilled student is not one student taught by the teacher."""
    stage = recipe.distill
    if not stage.enabled:
        raise DistillError("the recipe's distill stage is disabled: there is nothing to search")
    if stage.peers > 1 or stage.generations > 1 or recipe.assistants:
        raise DistillError(
            "distill sweep trains one student from the teacher per trial; recipes with distill.peers, "
            "distill.generations or assistants are not supported"
        )


def train_trial(recipe, data_dir: str | Path | None = None, on_epoch_end=None) -> TrialOutcome:
    """Train the distilled student of ``recipe`` (its first seed) and score it on the validation split.

    The teacher is loaded from ``teacher.weights``, or used as built when ``teacher.pretrained``
    (and read from ``teacher.cache`` when set); the
    test split is never evaluated. ``on_epoch_end(row)`` gets each epoch's metrics
    (``val_<primary metric>`` among them) and may return True to stop, as :class:`distill.Trainer`
    documents."""
    from distill.stage import build_stage, check_runnable
    from distill.tasks.base import get_task

    check_searchable(recipe)
    if recipe.teacher.weights is None and not recipe.teacher.pretrained:
        raise DistillError("a sweep trial loads its teacher: set teacher.weights (run_sweep does) or use a "
                           "pretrained teacher (teacher.pretrained: true)")
    task = get_task(recipe.task)
    check_runnable(recipe, task)
    prepared = _prepared(recipe, data_dir)
    if getattr(prepared, "val_loader", None) is None:
        raise DistillError("a sweep trial is scored on the validation split: set data.val_fraction (e.g. 0.1)")
    seed = recipe.seeds[0]
    student = task.build_model(recipe.student, prepared, seed)
    stage = build_stage(recipe, task, prepared, name="trial", student=student,
                        teacher=_teacher_signal(recipe, task, prepared), spec=recipe.distill, seed=seed)
    model, history = stage.fit(on_epoch_end=on_epoch_end)
    key = task.primary_metric
    score = float(task.evaluate(model, prepared, None, split="val")[key])
    return TrialOutcome(score, key, history, model, stage.stopped_early)


class EpochReporter:
    """``on_epoch_end`` for :class:`distill.Trainer`: report each epoch's validation score (``metric``)
    to an Optuna trial and stop training when its pruner says so (``pruned_at`` is then that epoch)."""

    def __init__(self, trial, metric: str = "val_accuracy") -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None
        self.last: float | None = None

    def __call__(self, row: dict[str, float]) -> bool:
        value = row.get(self.metric)
        if value is None:
            raise DistillError(f"the trial reports '{self.metric}', which is not among the metrics: {', '.join(row)}")
        epoch = int(row["epoch"])
        self.last = float(value)
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False


def _objective(trial, base: dict[str, Any], dims: list[Dimension], data_dir, repeats: int) -> float:
    optuna = require_optuna()
    from distill.measure import count_parameters, cpu_latency_ms
    from distill.recipes import load_recipe
    from distill.tasks.base import get_task

    started = time.perf_counter()
    params = {d.path: d.suggest(trial) for d in dims}
    try:
        recipe = load_recipe(apply_params(base, params))
        task = get_task(recipe.task)
        reporter = EpochReporter(trial, f"val_{task.primary_metric}")
        outcome = train_trial(recipe, data_dir, on_epoch_end=reporter)
    except DistillError as exc:
        trial.set_user_attr("error", str(exc))
        raise
    trial.set_user_attr("params", count_parameters(outcome.student))
    trial.set_user_attr("epochs", len(outcome.history))
    if reporter.pruned_at is not None:
        trial.set_user_attr("val_score", reporter.last)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
    example = task.latency_input(_prepared(recipe, data_dir))  # an input to time, not a measurement
    if example is not None:
        trial.set_user_attr("latency_ms", cpu_latency_ms(outcome.student, example, repeats=repeats))
    trial.set_user_attr("val_score", outcome.score)
    trial.set_user_attr("seconds", time.perf_counter() - started)
    return outcome.score
