"""One-batch dry run of a recipe: every tap's shape, the adapters it adds, each term's value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.batch_transforms import compose
from distill.objective import Distiller, DryRunReport
from distill.pipeline import stage_transform, terms_from
from distill.recipes.schema import Recipe


@dataclass
class CheckReport:
    stages: dict[str, DryRunReport] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [f"{name}: {p}" for name, r in self.stages.items() for p in r.problems]


def check_recipe(recipe: Recipe, data_dir: str | Path | None = None) -> CheckReport:
    """Build data, teacher and student of ``recipe`` and dry-run the baseline and distill stages.

    The teacher is untrained unless the recipe gives its weights: shapes and gradients are what is
    checked, not accuracy.
    """
    from distill.tasks.base import get_task

    task = get_task(recipe.task)
    prepared = task.prepare(recipe, data_dir)
    seed = recipe.seeds[0]
    teacher = task.build_model(recipe.teacher, prepared, seed)
    if recipe.teacher.device is not None:
        from distill.signals import parse_device

        parse_device(recipe.teacher.device)
    if recipe.teacher.ensemble is not None:
        from distill.ensemble import TeacherEnsemble

        members = [task.build_model(m, prepared, seed) for m in recipe.teacher.ensemble.members]
        teacher = TeacherEnsemble([teacher, *members], recipe.teacher.ensemble.weights, recipe.teacher.ensemble.combine)
    task.check_models(teacher, task.build_model(recipe.student, prepared, seed), prepared)
    report = CheckReport()
    stages = [("baseline", recipe.student, recipe.baseline, None)]
    for i, spec in enumerate(recipe.assistants):  # each assistant is distilled from the model before it
        stages.append((f"assistant{i + 1}", spec, recipe.distill, teacher))
        teacher = task.build_model(spec, prepared, seed)
    stages.append(("distill", recipe.student, recipe.distill, teacher))
    for name, model_spec, stage, teacher_arg in stages:
        if not stage.enabled:
            continue
        student = task.build_model(model_spec, prepared, seed)
        if name == "distill" and stage.peers > 1:
            from distill.mutual import MutualLearner

            peers = [task.build_model(recipe.student, prepared, seed + k) for k in range(1, stage.peers)]
            distiller = MutualLearner([student, *peers], terms_from(stage), feed=task.feed,
                                      num_samples=len(prepared.train))
        else:
            distiller = Distiller(student, teacher_arg, terms_from(stage), feed=task.feed,
                                  num_samples=len(prepared.train))
        spec = stage.train or recipe.train
        batch = next(iter(task.train_loader(recipe, prepared, spec.batch_size, seed)))
        transform = compose(stage_transform(recipe, stage),
                            task.batch_transform(recipe, prepared, student, teacher_arg))
        if transform is not None:
            batch = transform(batch, torch.Generator().manual_seed(0))
        result = distiller.dry_run(batch)
        report.stages[name] = result
    return report
