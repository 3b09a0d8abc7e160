"""A whole run from a recipe: teacher → baseline student → distilled student → evaluation → report.

Each stage trains in its own folder under ``RUN_DIR/stages`` with a checkpoint per epoch and a
``result.json`` when done, so ``resume=True`` skips finished stages and continues the rest. A
distilled student's folder (``stages/student-seed<N>``) holds ``student.safetensors`` and, when
its task has one (:meth:`distill.tasks.base.Task.save_pretrained`), the student in its own
ecosystem's format: ``hf/`` (Hugging Face ``save_pretrained``), ``model2vec/`` (Model2Vec).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.checkpoints import atomic_write
from distill.errors import DistillError
from distill.measure import count_parameters, size_bytes
from distill.models import load_weights, save_weights
from distill.recipes.loader import recipe_to_yaml
from distill.recipes.schema import ModelSpec, Recipe, StageSpec
from distill.run_result import RoleResult, RunResult
from distill.stage import (
    build_stage,
    check_runnable,
    live_signal,
    make_cache,
    open_cache,
    stage_schedule,
)
from distill.train_config import TrainConfig
from distill.trainer import distributed_state


def free_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def teacher_training(spec) -> TrainConfig | None:
    """How a teacher (or ensemble member) is trained by the run: ``train``, unless ``weights`` are
    given without ``finetune`` (then it is loaded as it is)."""
    if spec.weights is not None and not getattr(spec, "finetune", False):
        return None
    return spec.train


def fresh_augmentation(recipe: Recipe) -> Recipe:
    """``recipe`` with fresh augmentation every epoch instead of replayed views (``data.views``)."""
    if recipe.data.views is None:
        return recipe
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"views": None})})


class Run:
    """One recipe's run in ``run_dir``."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        data_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        console=None,
        source: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.source = source  # how the user named the recipe (a file or preset), for suggested commands
        self.stages_done = 0
        self.run_dir = Path(run_dir)
        self.data_dir = data_dir
        self.resume = resume
        self.progress = progress
        self.console = console
        # Under `accelerate launch` / `torchrun` every process runs this; only the main one writes.
        self.state = distributed_state()
        self.main = self.state.is_main_process
        from distill.tasks.base import get_task

        self.task = get_task(recipe.task)
        check_runnable(recipe, self.task)
        exists = self.run_dir.exists() and any(self.run_dir.iterdir())
        self.state.wait_for_everyone()
        if exists and not resume and not overwrite:
            raise DistillError(
                f"run directory {self.run_dir} already exists; pass --overwrite to replace it "
                "or --resume to continue it"
            )
        if self.main:
            if exists and not resume:
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()

    def say(self, message: str) -> None:
        if self.console is not None and self.main:
            self.console.print(message)

    # ------------------------------------------------------------------------------------
    def _train_stage(
        self, name: str, seed: int, model: nn.Module, teacher, stage: StageSpec, schedule: TrainConfig,
        prepared, peers: list[nn.Module] | None = None, recipe: Recipe | None = None,
    ) -> tuple[nn.Module, list[dict[str, float]]]:
        built = build_stage(recipe or self.recipe, self.task, prepared, name=name, student=model, teacher=teacher,
                            spec=stage, seed=seed, progress=self.progress, peers=peers, schedule=schedule)
        self.stages_done += 1
        label = f"stage {self.stages_done}/{self.stages_total()}: {name}"
        return built.fit(run_dir=self.run_dir / "stages" / name, resume=self.resume, console=self.console,
                         label=label)

    def stages_total(self) -> int:
        """How many stages the run trains (for the progress display's "stage 3/7")."""
        recipe = self.recipe
        total = 1 if teacher_training(recipe.teacher) is not None else 0
        if recipe.teacher.ensemble is not None:
            total += sum(teacher_training(m) is not None for m in recipe.teacher.ensemble.members)
        total += len(recipe.assistants)
        per_seed = int(recipe.baseline.enabled) + (recipe.distill.generations if recipe.distill.enabled else 0)
        return total + per_seed * len(recipe.seeds)

    def _stage_done(self, name: str) -> dict | None:
        path = self.run_dir / "stages" / name / "result.json"
        if self.resume and path.exists():
            return json.loads(path.read_text())
        return None

    def _trained(
        self, name: str, spec: ModelSpec, train: TrainConfig | None, seed: int, prepared,
        teacher=None, stage: StageSpec | None = None, fresh_views: bool = False,
    ) -> nn.Module:
        """The model of ``spec``: loaded, or trained as stage ``name`` (on labels, or from ``teacher``).
        ``fresh_views``: train on fresh augmentation every epoch even when the recipe replays fixed
        views for the cache (``data.views``): a teacher is not limited to what the students replay."""
        model = self.task.build_model(spec, prepared, seed)
        if train is None:
            return model
        weights_path = self.run_dir / "stages" / name / "model.safetensors"
        if self._stage_done(name) and weights_path.exists():
            load_weights(model, weights_path)
            self.say(f"{name}: loaded from the finished stage of this run")
            return model
        stage = stage or StageSpec(terms=[dict(self.task.label_term)])
        model, history = self._train_stage(name, seed, model, teacher, stage, train, prepared,
                                           recipe=fresh_augmentation(self.recipe) if fresh_views else None)
        if self.main:
            save_weights(model, weights_path)
            write_json(self.run_dir / "stages" / name / "result.json", {"history": history})
        self.state.wait_for_everyone()
        return model

    def _teacher(self, prepared) -> nn.Module:
        spec = self.recipe.teacher
        seed = self.recipe.seeds[0]
        train = teacher_training(spec)
        if spec.weights is not None:
            self.say(f"teacher: loaded {spec.weights}" + (
                ", fine-tuned with teacher.train (teacher.finetune)" if train is not None else
                " (not trained: teacher.train applies only with teacher.finetune: true)" if spec.train else ""))
        teacher = self._trained("teacher", spec, train, seed, prepared, fresh_views=True)
        if train is not None and self.main:
            save_weights(teacher, self.run_dir / "teacher.safetensors")
        if spec.ensemble is None:
            return teacher
        from distill.ensemble import TeacherEnsemble

        members = [teacher] + [
            self._trained(f"teacher-member{i + 1}", m, teacher_training(m), seed + i + 1, prepared, fresh_views=True)
            for i, m in enumerate(spec.ensemble.members)
        ]
        return TeacherEnsemble(members, spec.ensemble.weights, spec.ensemble.combine)

    def _assistants(self, signal, prepared) -> tuple[Any, list[dict[str, Any]]]:
        """Train the teacher-assistant chain; returns the signal that teaches the student and a summary."""
        recipe = self.recipe
        summary = []
        for i, spec in enumerate(recipe.assistants):
            name = f"assistant{i + 1}"
            model = self._trained(name, spec, spec.train or recipe.train, recipe.seeds[0], prepared,
                                  teacher=signal, stage=recipe.distill)
            metrics = self._evaluate(model, prepared, None)
            key = self.task.primary_metric
            summary.append({"model": spec.model, key: metrics[key], "params": count_parameters(model)})
            self.say(f"{name} ({spec.model}): test {key} {_show(key, metrics[key])}")
            signal = live_signal(recipe, self.task, model)
        return signal, summary

    def _signal(self, teacher: nn.Module, prepared):
        spec = self.recipe.teacher
        if spec.cache is None:
            return live_signal(self.recipe, self.task, teacher)
        path = Path(spec.cache)
        if spec.cache == "auto":
            path = self.run_dir / "teacher-cache"
            if not (self.resume and path.exists()):
                if self.main:
                    self.say(f"teacher cache: building {path}")
                    make_cache(self.recipe, self.task, teacher, prepared, path)
                self.state.wait_for_everyone()
        return open_cache(self.recipe, self.task, teacher, prepared, path)

    def _evaluate(self, model: nn.Module, prepared, reference) -> dict[str, float]:
        return self.task.evaluate(model, prepared, reference, split="test")

    def execute(self) -> RunResult:
        recipe = self.recipe
        torch.set_num_threads(recipe.threads or free_cores())
        if self.main:
            atomic_write(self.run_dir / "recipe.yaml", lambda f: f.write(recipe_to_yaml(recipe).encode()))
        task, key = self.task, self.task.primary_metric
        prepared = task.prepare(recipe, self.data_dir)
        self.say(f"data: {task.describe(prepared)}")
        teacher = self._teacher(prepared)
        task.check_models(teacher, task.build_model(recipe.student, prepared, 0), prepared)
        pilot = self._pilot(teacher) if recipe.pilot is not None and recipe.pilot.enabled else None
        recipe = self.recipe  # the pilot's choice, when there is one
        teacher_logits = task.reference(teacher, prepared)
        teacher_metrics = task.evaluate(teacher, prepared, None)
        self.say(f"teacher: test {key} {_show(key, teacher_metrics[key])}")
        gate = task.assess_teacher(recipe, teacher, prepared, teacher_metrics, teacher_logits)
        for line in (gate.summary(), *gate.notes):
            self.say(line)
        signal = self._signal(teacher, prepared) if recipe.distill.enabled and recipe.distill.peers == 1 else None
        assistants: list[dict[str, Any]] = []
        if recipe.assistants and signal is not None:
            signal, assistants = self._assistants(signal, prepared)

        per_seed: dict[str, list[dict[str, float]]] = {"baseline": [], "student": []}
        histories: dict[str, list[list[dict[str, float]]]] = {"baseline": [], "student": []}
        generations: list[list[float]] = []
        student_model = None
        for seed in recipe.seeds:
            for role, stage, teacher_arg in (("baseline", recipe.baseline, None), ("student", recipe.distill, signal)):
                if not stage.enabled:
                    continue
                if role == "student" and stage.generations > 1:
                    teacher_arg, accuracies = self._born_again(seed, signal, prepared, teacher_logits)
                    generations.append(accuracies)
                name = f"{role}-seed{seed}"
                done = self._stage_done(name)
                model = task.build_model(recipe.student, prepared, seed)
                weights = self.run_dir / "stages" / name / "student.safetensors"
                if done and weights.exists():
                    metrics = done["test"]
                    histories[role].append(done.get("history", []))
                    if role == "student" and student_model is None:
                        load_weights(model, weights)
                        student_model = model
                else:
                    spec = stage_schedule(recipe, stage)
                    peers = None
                    if role == "student" and stage.peers > 1:  # mutual learning: fresh peers, other seeds
                        peers = [task.build_model(recipe.student, prepared, seed + 7919 * k) for k in range(1, stage.peers)]
                    model, history = self._train_stage(name, seed, model, teacher_arg, stage, spec, prepared, peers)
                    histories[role].append(history)
                    metrics = self._evaluate(model, prepared, teacher_logits)
                    if self.main:
                        save_weights(model, weights)
                        if role == "student":  # also in its ecosystem's format (hf/, model2vec/), when it has one
                            task.save_pretrained(model, prepared, weights.parent)
                        write_json(weights.parent / "result.json", {"test": metrics, "history": history})
                    self.state.wait_for_everyone()
                    if role == "student" and student_model is None:
                        student_model = model
                per_seed[role].append(metrics)
                agreement = (f", agreement with teacher {100 * metrics['agreement']:.2f}%"
                             if "agreement" in metrics else "")
                self.say(f"{role} (seed {seed}): test {key} {_show(key, metrics[key])}{agreement}")
                if role == "baseline" and len(per_seed["baseline"]) == 1 and gate.enabled:  # before distilling
                    gate.check_baseline(metrics[key]).raise_if_failed()
                    self.say(gate.summary())

        results = self._summarise(teacher, teacher_metrics, per_seed, prepared)
        results.teacher_gate = gate.to_dict()
        differs = schedule_difference(recipe)
        if differs and results.compared:
            results.schedule_difference = differs
            results.verdict += (f" (not like for like: the distilled student trains with another schedule than "
                                f"the student alone: {differs})")
        advice = advise(results, histories, recipe, self.source)
        if advice:
            results.advice = advice
            results.verdict += f". Likely cause: {advice['cause']}. Try: {advice['command']}"
        if pilot is not None:
            results.pilot = pilot
        if assistants:
            results.assistants = assistants
        if generations:  # born-again: mean accuracy of each generation (the last is "student")
            results.generations = [statistics.fmean(g) for g in zip(*generations)]
            if results.student is not None:
                results.generations.append(results.student.metric(key))
        if self.main:
            if student_model is not None:
                save_weights(student_model, self.run_dir / "student.safetensors")
            results.save(self.run_dir / "results.json")
            from distill.report import write_report

            write_report(self.run_dir, results)
        self.state.wait_for_everyone()
        return results

    def _pilot(self, teacher: nn.Module) -> dict[str, Any]:
        """Choose the distill stage's settings on validation data (:mod:`distill.pilot`) before any
        test-split evaluation; the choice replaces the recipe's settings and is written to
        ``recipe.yaml`` and ``pilot.json`` (a resumed run reads it back)."""
        from distill.pilot import apply_settings, run_pilot

        path = self.run_dir / "pilot.json"
        if self.resume and path.exists():
            found = json.loads(path.read_text())
            settings = {k: v for k, v in found["chosen"].items() if k != "label"}
            self.recipe = apply_settings(self.recipe, settings)
            self.say(f"pilot: read from {path}")
            return found
        chosen, result = run_pilot(self.recipe, self.task, teacher, self.data_dir, console=self.console if self.main else None)
        self.recipe = chosen
        found = result.to_dict()
        found["summary"] = result.summary()
        self.say(found["summary"])
        if self.main:
            write_json(path, found)
            atomic_write(self.run_dir / "recipe.yaml", lambda f: f.write(recipe_to_yaml(chosen).encode()))
        self.state.wait_for_everyone()
        return found

    def _born_again(self, seed: int, signal, prepared, teacher_logits) -> tuple[Any, list[float]]:
        """Generations 1..G-1 of born-again training; returns the signal for generation G."""
        recipe = self.recipe
        accuracies = []
        for g in range(1, recipe.distill.generations):
            name = f"student-gen{g}-seed{seed}"
            model = self._trained(name, recipe.student, stage_schedule(recipe, recipe.distill), seed + 104729 * g,
                                  prepared, teacher=signal, stage=recipe.distill)
            key = self.task.primary_metric
            accuracies.append(self._evaluate(model, prepared, teacher_logits)[key])
            self.say(f"born-again generation {g} (seed {seed}): test {key} {_show(key, accuracies[-1])}")
            signal = live_signal(recipe, self.task, model)
        return signal, accuracies

    def _summarise(self, teacher, teacher_metrics, per_seed, prepared) -> RunResult:
        recipe = self.recipe
        student_arch = self.task.build_model(recipe.student, prepared, 0)
        repeats = recipe.evaluate.latency_repeats

        def describe(model: nn.Module) -> dict[str, Any]:
            info = {"params": count_parameters(model), "size_bytes": size_bytes(model)}
            latency = self.task.latency_ms(model, prepared, repeats) if recipe.evaluate.latency else None
            if latency is not None:
                info["latency_ms"] = latency
            return info

        teacher_info = describe(teacher)
        student_info = describe(student_arch)
        roles: dict[str, RoleResult] = {}
        for role, rows in per_seed.items():
            if not rows:
                continue
            summary: dict[str, Any] = {"model": recipe.student.model, **student_info}
            for key in rows[0]:
                values = [r[key] for r in rows]
                summary[key] = statistics.fmean(values)
                summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            key = self.task.primary_metric
            summary["per_seed"] = {key: [r[key] for r in rows]}
            roles[role] = RoleResult(**summary)
        labelled = getattr(prepared, "labelled", None)  # an unlabelled transfer set (data.labelled)
        result = RunResult(
            recipe=recipe.name, task=self.task.name, primary_metric=self.task.primary_metric,
            data=recipe.data.name, seeds=list(recipe.seeds), threads=torch.get_num_threads(),
            training_samples=len(prepared.train), labelled_samples=None if labelled is None else len(labelled),
            teacher=RoleResult(**{**teacher_metrics, "agreement": 1.0, "model": recipe.teacher.model, **teacher_info}),
            baseline=roles.get("baseline"), student=roles.get("student"),
            report_metrics=list(self.task.report_metrics),  # more columns for the report (e.g. perplexity)
        )
        result.verdict = verdict(result)
        return result


def _show(key: str, value: float) -> str:
    """A metric for the log: fractions in [0, 1] as percentages (accuracy, HR, NDCG, mAP)."""
    return f"{100 * value:.2f}%" if 0.0 <= value <= 1.0 and key != "perplexity" else f"{value:.4g}"


def verdict(results: RunResult | dict[str, Any]) -> str:
    """One sentence: did distillation beat the student trained alone, beyond the seed spread?"""
    results = RunResult.parse(results)
    if not results.compared:
        return "no comparison: the baseline or the distilled student was not trained"
    key = results.primary_metric
    b, s = results.baseline, results.student
    gain = 100 * (s.metric(key) - b.metric(key))
    spread = 100 * max(b.std(key), s.std(key))
    n = len(b.per_seed[key])
    if n < 2:
        return f"distilled − baseline = {gain:+.2f} points on one seed: run more seeds to judge"
    if gain > spread:
        return (f"distillation helped: {gain:+.2f} points over the student trained alone, "
                f"beyond the spread ({spread:.2f}) over {n} seeds")
    if gain < -spread:
        return (f"distillation hurt: {gain:+.2f} points against the student trained alone, "
                f"beyond the spread ({spread:.2f}) over {n} seeds")
    return (f"no clear effect: {gain:+.2f} points, within the spread ({spread:.2f}) over {n} seeds")


def schedule_difference(recipe: Recipe) -> str:
    """How the distilled stage's schedule differs from the baseline's (``""`` when it does not): the
    recipe may ask for that (a stage's own ``train:``), and then the report says so."""
    ignored = {"checkpoint_every", "tensorboard", "progress", "seed", "channels_last"}  # not what is learned
    base = stage_schedule(recipe, recipe.baseline).model_dump()
    dist = stage_schedule(recipe, recipe.distill).model_dump()
    return ", ".join(f"{k} {dist[k]} vs {base[k]}" for k in base if k not in ignored and base[k] != dist[k])


def still_improving(histories: list[list[dict[str, float]]], key: str) -> bool:
    """Whether the students were still improving when their schedule ended: the validation metric
    was best at the last epoch on most seeds, or (without validation) the training loss fell by more
    than 5% over the last fifth of the epochs on most seeds."""
    votes = []
    for rows in histories:
        if len(rows) < 3:
            continue
        metric = f"val_{key}"
        if all(metric in r for r in rows):
            values = [r[metric] for r in rows]
            votes.append(values[-1] >= max(values[:-1]))
        elif all("train_loss" in r for r in rows):
            tail = max(1, len(rows) // 5)
            before, last = rows[-1 - tail]["train_loss"], rows[-1]["train_loss"]
            votes.append(before > 0 and (before - last) / before > 0.05)
    return bool(votes) and sum(votes) > len(votes) / 2


def advise(results: RunResult | dict[str, Any], histories: dict[str, list], recipe: Recipe,
           source: str | None = None) -> dict[str, str] | None:
    """When distillation did not beat the student alone: the likely cause, from what the run measured,
    and the one command to try next (``None`` when it helped, or nothing was compared)."""
    results = RunResult.parse(results)
    if not results.compared or results.verdict.startswith("distillation helped"):
        return None
    key = results.primary_metric
    teacher, alone = results.teacher.metric(key), results.baseline.metric(key)
    spread = max(results.baseline.std(key), results.student.std(key))
    name = source or "RECIPE"  # the file or preset the run was started from
    epochs = stage_schedule(recipe, recipe.distill).epochs
    if teacher - alone < max(0.01, 2 * spread):
        teacher_epochs = recipe.teacher.train.epochs if recipe.teacher.train is not None else None
        more = f"--set teacher.train.epochs={2 * teacher_epochs}" if teacher_epochs else "--set teacher.weights=BETTER.safetensors"
        return {"cause": f"the teacher ({_show(key, teacher)}) is barely better than the student alone "
                         f"({_show(key, alone)}): it has little to teach",
                "command": f"distill run {name} {more}"}
    if still_improving(histories["student"], key):
        return {"cause": f"the distilled students were still improving at their last epoch ({epochs}): the "
                         "schedule is too short for distillation, which needs patience",
                "command": f"distill run {name} --set train.epochs={2 * epochs}"}
    s_agree, b_agree = results.student.metric("agreement"), results.baseline.metric("agreement")
    if s_agree is not None and b_agree is not None and s_agree - b_agree < 0.01:
        return {"cause": f"the distilled student agrees with the teacher no more than the student alone does "
                         f"({100 * s_agree:.1f}% vs {100 * b_agree:.1f}%): a capacity gap, the student cannot "
                         "follow this teacher",
                "command": f"distill ladder {name}"}
    if recipe.pilot is None:
        return {"cause": "the temperature and term weights were not chosen for this data",
                "command": f"distill run {name} --pilot"}
    return {"cause": "the pilot's best setting did not carry over from validation to test",
            "command": f"distill run {name} --set train.epochs={2 * epochs}"}


def run_recipe(recipe: Recipe, run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Run ``recipe`` in ``run_dir``; returns the results written to ``results.json`` (typed: a
    :class:`~distill.run_result.RunResult`, which also answers ``result["student"]`` as the dict
    returned before did)."""
    return Run(recipe, run_dir, **kwargs).execute()
