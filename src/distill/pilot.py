"""The pilot: choose the distillation settings on validation data before the run spends its budget.

A recipe's ``pilot:`` section (or ``distill run --pilot``) spends a bounded share of the run's
training (``budget``, a quarter by default, stated in the report) on a validation split carved
from the training data, never the test split:

1. the student alone, and the student distilled at every candidate setting (``temperatures`` for
   every term whose loss takes a temperature, times ``teacher_weights``: the teacher terms' share
   of the total weight, the label terms keeping the rest), each trained for the same short
   schedule on the rest of the training data, from the first seed;
2. each scored by the task's primary metric on the validation split;
3. the best setting is written into the run's recipe (``recipe.yaml``) and its report; when no
   setting beat the student alone on validation, the report says so plainly (and the run still
   trains and reports the full comparison).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.losses import get_loss


@dataclass
class PilotTrial:
    label: str
    settings: dict[str, Any]
    score: float


@dataclass
class PilotResult:
    """What the pilot tried and chose (``chosen`` is the best distilled setting)."""

    metric: str
    epochs: int
    budget_epochs: int
    run_epochs: int
    train_samples: int
    val_samples: int
    alone: float
    trials: list[PilotTrial] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    beat_alone: bool = False
    seconds: float | None = None  # wall time of the pilot's trials
    notes: list[str] = field(default_factory=list)
    stage_epochs: int | None = None  # the distilled stage's epochs in the run (the trials' are ``epochs``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        best = max(self.trials, key=lambda t: t.score)
        head = (f"pilot ({self.epochs} epochs per trial, {len(self.trials) + 1} trials = "
                f"{self.epochs * (len(self.trials) + 1)} of the run's {self.run_epochs} training epochs; "
                f"{self.val_samples} validation samples carved from training): ")
        if self.beat_alone:
            return head + (f"chose {best.label} (validation {self.metric} {_pct(best.score)} vs "
                           f"{_pct(self.alone)} alone)")
        shorter = ""
        if self.stage_epochs is not None and self.epochs < self.stage_epochs:
            shorter = (f"; its trials ran {self.epochs} of the run's {self.stage_epochs} epochs, and distillation's gain "
                       "often grows with the schedule (distill's schedule-curve benchmark), so the run may still win")
        return head + (f"no setting beat the student alone on validation (best {best.label}: {_pct(best.score)} "
                       f"vs {_pct(self.alone)} alone); the run uses it anyway and reports the full comparison{shorter}")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if 0 <= value <= 1 else f"{value:.4g}"


def candidate_settings(recipe, spec) -> list[tuple[str, dict[str, Any]]]:
    """``(label, {override path: value})`` for every candidate of the distill stage's terms."""
    terms = recipe.distill.terms
    tempered = [i for i, t in enumerate(terms) if "temperature" in get_loss(t.loss).param_names()]
    teacher_terms = [i for i, t in enumerate(terms) if get_loss(t.loss).needs_teacher]
    label_terms = [i for i, t in enumerate(terms) if not get_loss(t.loss).needs_teacher]
    temperatures = spec.temperatures if tempered else [None]
    shares = spec.teacher_weights if teacher_terms and label_terms else [None]
    teacher_total = sum(terms[i].weight for i in teacher_terms) or 1.0
    label_total = sum(terms[i].weight for i in label_terms) or 1.0
    out = []
    for t in temperatures:
        for share in shares:
            settings: dict[str, Any] = {}
            parts = []
            if t is not None:
                for i in tempered:
                    settings[f"distill.terms.{i}.params.temperature"] = float(t)
                parts.append(f"T {t:g}")
            if share is not None:
                for i in teacher_terms:
                    settings[f"distill.terms.{i}.weight"] = round(share * terms[i].weight / teacher_total, 6)
                for i in label_terms:
                    settings[f"distill.terms.{i}.weight"] = round((1 - share) * terms[i].weight / label_total, 6)
                parts.append(f"teacher weight {share:g}")
            out.append((", ".join(parts) or "the recipe's settings", settings))
    return out


def apply_settings(recipe, settings: dict[str, Any]):
    """A copy of ``recipe`` with the override paths of ``settings`` set (validated again)."""
    from distill.recipes.loader import apply_override_value, load_recipe

    data = recipe.model_dump(mode="json")
    for path, value in settings.items():
        apply_override_value(data, path, value)
    return load_recipe(data)


def pilot_epochs(recipe, spec, trials: int) -> tuple[int, int, int]:
    """Epochs per trial, the budget in epochs, and the run's training epochs (students only)."""
    from distill.stage import stage_schedule

    per_seed = 0
    if recipe.baseline.enabled:
        per_seed += stage_schedule(recipe, recipe.baseline).epochs
    per_seed += stage_schedule(recipe, recipe.distill).epochs
    run_epochs = per_seed * len(recipe.seeds)
    budget = int(spec.budget * run_epochs)
    epochs = min(stage_schedule(recipe, recipe.distill).epochs, budget // trials)
    if epochs < 1:
        raise DistillError(
            f"pilot: a budget of {spec.budget:g} x {run_epochs} training epochs cannot give {trials} trials an "
            "epoch each; raise pilot.budget, or give fewer temperatures / teacher_weights"
        )
    return epochs, budget, run_epochs


def run_pilot(recipe, task, teacher, data_dir, console=None) -> tuple[Any, PilotResult]:
    """Run the pilot of ``recipe`` with the trained ``teacher``; returns the recipe with the chosen
    settings and what the pilot measured."""
    from distill.stage import build_stage, live_signal, stage_schedule

    spec = recipe.pilot
    carved = recipe
    if recipe.data.val_fraction == 0:
        carved = recipe.model_copy(update={"data": recipe.data.model_copy(update={"val_fraction": spec.val_fraction})})
    prepared = task.prepare(carved, data_dir)
    val_samples = len(prepared.val) if getattr(prepared, "val", None) is not None else None
    if getattr(prepared, "val_loader", None) is None:
        raise DistillError(f"pilot: task '{task.name}' made no validation split; set data.val_fraction")
    if val_samples is not None and val_samples < spec.min_val_samples:
        raise DistillError(
            f"pilot: the validation split holds {val_samples} samples, too few to tell settings apart "
            f"(it needs at least {spec.min_val_samples}); raise pilot.val_fraction (or data.val_fraction) "
            "or use more training data"
        )
    import time

    started = time.perf_counter()
    candidates = candidate_settings(recipe, spec)
    epochs, budget, run_epochs = pilot_epochs(recipe, spec, len(candidates) + 1)
    seed = recipe.seeds[0]
    signal = live_signal(recipe, task, teacher)
    key = task.primary_metric

    def score(trial_recipe, stage_spec, teacher_arg, name: str) -> float:
        student = task.build_model(trial_recipe.student, prepared, seed)
        schedule = stage_schedule(trial_recipe, stage_spec).model_copy(update={"epochs": epochs})
        stage = build_stage(trial_recipe, task, prepared, name=name, student=student, teacher=teacher_arg,
                            spec=stage_spec, seed=seed, schedule=schedule)
        model, _ = stage.fit()
        return float(task.evaluate(model, prepared, None, split="val")[key])

    alone = score(carved, carved.baseline, None, "pilot-alone")
    if console is not None:
        console.print(f"pilot: student alone, validation {key} {_pct(alone)}", markup=False)
    result = PilotResult(metric=key, epochs=epochs, budget_epochs=budget, run_epochs=run_epochs,
                         train_samples=len(prepared.train), val_samples=val_samples or 0, alone=alone,
                         stage_epochs=stage_schedule(recipe, recipe.distill).epochs)
    for i, (label, settings) in enumerate(candidates):
        trial_recipe = apply_settings(carved, settings)
        value = score(trial_recipe, trial_recipe.distill, signal, f"pilot-{i + 1}")
        result.trials.append(PilotTrial(label, settings, value))
        if console is not None:
            console.print(f"pilot: {label}: validation {key} {_pct(value)}", markup=False)
    best = max(result.trials, key=lambda t: (t.score, -result.trials.index(t)))
    result.chosen = {"label": best.label, **best.settings}
    result.beat_alone = best.score > alone and not math.isclose(best.score, alone)
    result.seconds = round(time.perf_counter() - started, 1)
    return apply_settings(recipe, best.settings), result
