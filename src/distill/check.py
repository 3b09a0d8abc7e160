"""One-batch dry run of a recipe: every tap's shape, the adapters it adds, each term's value.

The stages are built by :func:`distill.stage.build_stage`, as ``distill run`` builds them: the
same terms, batch transforms (the task's too, e.g. on-policy generation) and schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill.objective import DryRunReport
from distill.recipes.schema import Recipe
from distill.stage import build_stage, check_runnable, check_signal, live_signal


@dataclass
class CheckReport:
    stages: dict[str, DryRunReport] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [f"{name}: {p}" for name, r in self.stages.items() for p in r.problems]


def check_recipe(recipe: Recipe, data_dir: str | Path | None = None) -> CheckReport:
    """Build data, teacher and student of ``recipe`` and dry-run the baseline and distill stages
    (and each assistant's). Refuses what ``distill run`` would refuse before any work.

    The teacher is untrained unless the recipe gives its weights: shapes and gradients are what is
    checked, not accuracy.
    """
    from distill.tasks.base import get_task

    task = get_task(recipe.task)
    check_runnable(recipe, task)
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
    signal = check_signal(recipe, task, teacher, prepared)
    stages = [("baseline", recipe.student, recipe.baseline, None)]
    for i, spec in enumerate(recipe.assistants):  # each assistant is distilled from the model before it
        stages.append((f"assistant{i + 1}", spec, recipe.distill, signal))
        signal = live_signal(recipe, task, task.build_model(spec, prepared, seed))
    stages.append(("distill", recipe.student, recipe.distill, None if recipe.distill.peers > 1 else signal))
    for name, model_spec, stage, teacher_arg in stages:
        if not stage.enabled:
            continue
        student = task.build_model(model_spec, prepared, seed)
        peers = None
        if name == "distill" and stage.peers > 1:
            peers = [task.build_model(recipe.student, prepared, seed + k) for k in range(1, stage.peers)]
        # an assistant trains with its own schedule or the recipe's, as in distill run
        schedule = (model_spec.train or recipe.train) if name.startswith("assistant") else None
        built = build_stage(recipe, task, prepared, name=name, student=student, teacher=teacher_arg, spec=stage,
                            seed=seed, peers=peers, schedule=schedule)
        report.stages[name] = built.dry_run()
    return report
