"""A whole run from a recipe: teacher → baseline student → distilled student → evaluation → report.

Each stage trains in its own folder under ``RUN_DIR/stages`` with a checkpoint per epoch and a
``result.json`` when done, so ``resume=True`` skips finished stages and continues the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.batch_transforms import compose, mixup_transform, shift_transform
from distill.checkpoints import atomic_write
from distill.data import BatchLoader, DataSplits, load_dataset, split_validation
from distill.data.splits import training_subset
from distill.errors import DistillError
from distill.measure import count_parameters, size_bytes
from distill.models import create_model, load_weights, save_weights
from distill.objective import Distiller, Term
from distill.recipes.loader import recipe_to_yaml
from distill.recipes.schema import ModelSpec, Recipe, StageSpec, TrainSpec
from distill.signals import LiveTeacher, default_feed
from distill.tasks.classification import classification_metrics, predict
from distill.trainer import TrainConfig, Trainer, distributed_state


def free_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def train_config(spec: TrainSpec, seed: int, progress: bool) -> TrainConfig:
    fields = spec.model_dump(exclude={"batch_size"})
    return TrainConfig(**fields, seed=seed, progress=progress)


def terms_from(stage: StageSpec) -> list[Term]:
    return [
        Term(name=t.name, loss=t.loss, weight=t.weight, student=t.student, teacher=t.teacher,
             params=dict(t.params), adapter=t.adapter, warmup_epochs=t.warmup_epochs)
        for t in stage.terms
    ]


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


@dataclass
class Prepared:
    """Data and loaders of a run, built once and shared by every stage."""

    data: DataSplits
    train: Any
    val: Any | None
    test_loader: BatchLoader
    val_loader: BatchLoader | None


def prepare_data(recipe: Recipe, data_dir: str | Path | None) -> Prepared:
    spec = recipe.data
    data = load_dataset(spec.name, data_dir, **spec.options)
    if spec.augment.shift and data.is_image:
        raise DistillError("data.augment.shift is for 1-D signals; use crop_padding and flip for images")
    train = training_subset(data.train, spec.train_subset, spec.seed)
    val = None
    if spec.val_fraction > 0:
        train, val = split_validation(train, spec.val_fraction, seed=spec.seed)
    kwargs = dict(mean=data.mean, std=data.std)
    test_loader = BatchLoader(data.test, spec.eval_batch_size, shuffle=False, **kwargs)
    val_loader = BatchLoader(val, spec.eval_batch_size, shuffle=False, **kwargs) if val is not None else None
    return Prepared(data, train, val, test_loader, val_loader)


def train_loader(recipe: Recipe, prepared: Prepared, batch_size: int, seed: int) -> BatchLoader:
    augment = recipe.data.augment.model_dump(include={"crop_padding", "flip"}) if prepared.data.is_image else None
    return BatchLoader(
        prepared.train, batch_size, shuffle=True, seed=seed, drop_last=len(prepared.train) > batch_size,
        mean=prepared.data.mean, std=prepared.data.std, augment=augment,
        views=recipe.data.views, view_seed=recipe.data.seed,
    )


def teacher_taps(recipe: Recipe) -> list[str]:
    """The teacher taps the distill stage reads (what a cache must hold besides logits)."""
    from distill.losses import get_loss

    from distill.objective import tap_names

    return list(dict.fromkeys(
        name for t in recipe.distill.terms if get_loss(t.loss).needs_teacher
        for name in tap_names(t.teacher) if name != "logits"
    ))


def make_cache(recipe: Recipe, teacher: nn.Module, prepared: Prepared, path: str | Path) -> Path:
    """Run ``teacher`` once over the training set (every replayed view) and store its outputs."""
    from distill.cache import build_cache

    loader = train_loader(recipe, prepared, recipe.train.batch_size, recipe.seeds[0])
    return build_cache(
        teacher, loader, path, taps=teacher_taps(recipe), topk=recipe.teacher.cache_topk,
        dtype=recipe.teacher.cache_dtype,
    )


def open_cache(recipe: Recipe, teacher: nn.Module, prepared: Prepared, path: str | Path):
    """The cache at ``path``, refused unless it was made by this teacher on this data and transforms."""
    from distill.cache import TeacherCache, fingerprint

    loader = train_loader(recipe, prepared, recipe.train.batch_size, recipe.seeds[0])
    if not Path(path).exists():
        raise DistillError(f"teacher cache {path} does not exist; build it with `distill cache RECIPE --out {path}`")
    return TeacherCache(path, expect_fingerprint=fingerprint(teacher, loader))


def stage_transform(recipe: Recipe, stage: StageSpec | None):
    """The per-step batch transform of a stage: 1-D shifts, then function-matching mixup."""
    shift = recipe.data.augment.shift
    return compose(
        shift_transform(shift) if shift else None,
        mixup_transform(stage.mixup_alpha) if stage is not None and stage.mixup_alpha else None,
    )


def build_model(spec: ModelSpec, data: DataSplits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(spec.model, data.num_classes, data.input_shape, weights=spec.weights, **spec.kwargs)


def check_classes(teacher: nn.Module, student: nn.Module, prepared: Prepared) -> None:
    """Teacher, student and data must share one label space."""
    batch = {"input": next(iter(prepared.test_loader))["input"][:2]}
    check_label_space(teacher, student, batch, default_feed, prepared.data)


def check_label_space(teacher: nn.Module, student: nn.Module, batch: dict, feed, data) -> None:
    """Raise a :class:`DistillError` unless teacher and student, fed ``batch`` by ``feed``, predict
    ``data.num_classes`` classes (``data`` names the data set); both models keep their mode."""
    from distill.taps import output_tensor

    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    with torch.no_grad():
        t, s = output_tensor(feed(teacher, batch)).shape[-1], output_tensor(feed(student, batch)).shape[-1]
    teacher.train(modes[0]), student.train(modes[1])
    if t != s:
        raise DistillError(f"teacher predicts {t} classes but the student {s}; they must share the label space")
    if t != data.num_classes:
        raise DistillError(f"teacher predicts {t} classes, but data set '{data.name}' has {data.num_classes}")


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
    ) -> None:
        self.recipe = recipe
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
        self._check_function_matching()
        self._check_cache()
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

    def _check_cache(self) -> None:
        recipe = self.recipe
        if recipe.teacher.cache is None:
            return
        if not self.task.supports_cache:
            raise DistillError(f"teacher.cache is not available for task '{self.task.name}'; use the live teacher")
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

    def _check_function_matching(self) -> None:
        stage = self.recipe.distill
        if stage.mixup_alpha is not None:
            from distill.losses import get_loss

            readers = [t.name for t in stage.terms if "labels" in get_loss(t.loss).inputs and t.weight != 0]
            if readers:
                raise DistillError(
                    f"distill.mixup_alpha is set, but terms {', '.join(readers)} read labels, which do "
                    "not describe mixed inputs; drop them (function matching uses teacher targets only)"
                )

    def say(self, message: str) -> None:
        if self.console is not None and self.main:
            self.console.print(message)

    # ------------------------------------------------------------------------------------
    def _train_stage(
        self, name: str, seed: int, model: nn.Module, teacher, stage: StageSpec, spec: TrainSpec,
        prepared: Prepared, peers: list[nn.Module] | None = None,
    ) -> tuple[nn.Module, list[dict[str, float]]]:
        stage_dir = self.run_dir / "stages" / name
        if peers:
            from distill.mutual import MutualLearner

            distiller = MutualLearner([model, *peers], terms_from(stage), feed=self.task.feed,
                                      num_samples=len(prepared.train))
        else:
            distiller = Distiller(model, teacher, terms_from(stage), feed=self.task.feed,
                                  num_samples=len(prepared.train))
        loader = self.task.train_loader(self.recipe, prepared, spec.batch_size, seed)
        first = next(iter(loader))
        transform = compose(stage_transform(self.recipe, stage),
                            self.task.batch_transform(self.recipe, prepared, model, teacher))
        report = distiller.dry_run(transform(first, torch.Generator().manual_seed(0)) if transform else first)
        if report.problems:
            raise DistillError(f"{name}: " + "; ".join(report.problems))
        evaluate = None
        if prepared.val_loader is not None:
            task = self.task

            def evaluate(m: Distiller) -> dict[str, float]:
                return task.evaluate(m.student, prepared, None, split="val")

        trainer = Trainer(
            distiller, loader, train_config(spec, seed, self.progress), evaluate=evaluate,
            run_dir=stage_dir, name=name, batch_transform=transform, console=self.console,
        )
        history = trainer.fit(resume=self.resume)
        return distiller.export_student(), history

    def _stage_done(self, name: str) -> dict | None:
        path = self.run_dir / "stages" / name / "result.json"
        if self.resume and path.exists():
            return json.loads(path.read_text())
        return None

    def _trained(
        self, name: str, spec: ModelSpec, train: TrainSpec | None, seed: int, prepared: Prepared,
        teacher=None, stage: StageSpec | None = None,
    ) -> nn.Module:
        """The model of ``spec``: loaded, or trained as stage ``name`` (on labels, or from ``teacher``)."""
        model = self.task.build_model(spec, prepared, seed)
        if train is None:
            return model
        weights_path = self.run_dir / "stages" / name / "model.safetensors"
        if self._stage_done(name) and weights_path.exists():
            load_weights(model, weights_path)
            self.say(f"{name}: loaded from the finished stage of this run")
            return model
        stage = stage or StageSpec(terms=[dict(self.task.label_term)])
        model, history = self._train_stage(name, seed, model, teacher, stage, train, prepared)
        if self.main:
            save_weights(model, weights_path)
            write_json(self.run_dir / "stages" / name / "result.json", {"history": history})
        self.state.wait_for_everyone()
        return model

    def _teacher(self, prepared: Prepared) -> nn.Module:
        spec = self.recipe.teacher
        seed = self.recipe.seeds[0]
        teacher = self._trained("teacher", spec, spec.train, seed, prepared)
        if spec.train is not None and self.main:
            save_weights(teacher, self.run_dir / "teacher.safetensors")
        if spec.ensemble is None:
            return teacher
        from distill.ensemble import TeacherEnsemble

        members = [teacher] + [
            self._trained(f"teacher-member{i + 1}", m, m.train, seed + i + 1, prepared)
            for i, m in enumerate(spec.ensemble.members)
        ]
        return TeacherEnsemble(members, spec.ensemble.weights, spec.ensemble.combine)

    def _assistants(self, signal, prepared: Prepared) -> tuple[Any, list[dict[str, Any]]]:
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
            signal = LiveTeacher(model, precision=recipe.teacher.precision, device=recipe.teacher.device,
                                 feed=self.task.feed)
        return signal, summary

    def _signal(self, teacher: nn.Module, prepared: Prepared):
        spec = self.recipe.teacher
        if spec.cache is None:
            return LiveTeacher(teacher, precision=spec.precision, device=spec.device, feed=self.task.feed)
        path = Path(spec.cache)
        if spec.cache == "auto":
            path = self.run_dir / "teacher-cache"
            if not (self.resume and path.exists()):
                if self.main:
                    self.say(f"teacher cache: building {path}")
                    make_cache(self.recipe, teacher, prepared, path)
                self.state.wait_for_everyone()
        return open_cache(self.recipe, teacher, prepared, path)

    def _evaluate(self, model: nn.Module, prepared: Prepared, reference) -> dict[str, float]:
        return self.task.evaluate(model, prepared, reference, split="test")

    def execute(self) -> dict[str, Any]:
        recipe = self.recipe
        torch.set_num_threads(recipe.threads or free_cores())
        if self.main:
            atomic_write(self.run_dir / "recipe.yaml", lambda f: f.write(recipe_to_yaml(recipe).encode()))
        task, key = self.task, self.task.primary_metric
        prepared = task.prepare(recipe, self.data_dir)
        self.say(f"data: {task.describe(prepared)}")
        teacher = self._teacher(prepared)
        task.check_models(teacher, task.build_model(recipe.student, prepared, 0), prepared)
        teacher_logits = task.reference(teacher, prepared)
        teacher_metrics = task.evaluate(teacher, prepared, None)
        self.say(f"teacher: test {key} {_show(key, teacher_metrics[key])}")
        from distill.quality import assess_teacher, teacher_gate  # the teacher quality gate (teacher.gate)

        if task.name == "classification":
            targets = torch.cat([b["target"] for b in prepared.test_loader])
            gate = assess_teacher(recipe.teacher.gate, teacher, prepared, teacher_logits, targets, recipe.baseline.enabled)
        else:  # no calibration outside classification: the threshold and the baseline comparison
            spec = recipe.teacher.gate
            gate = teacher_gate(teacher_metrics[key], min_accuracy=spec.min_accuracy, enabled=spec.enabled,
                                require_better_than_baseline=spec.require_better_than_baseline)
            gate.raise_if_failed()
        for line in (gate.summary(), *gate.notes):
            self.say(line)
        signal = self._signal(teacher, prepared) if recipe.distill.enabled and recipe.distill.peers == 1 else None
        assistants: list[dict[str, Any]] = []
        if recipe.assistants and signal is not None:
            signal, assistants = self._assistants(signal, prepared)

        per_seed: dict[str, list[dict[str, float]]] = {"baseline": [], "student": []}
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
                    if role == "student" and student_model is None:
                        load_weights(model, weights)
                        student_model = model
                else:
                    spec = stage.train or recipe.train
                    peers = None
                    if role == "student" and stage.peers > 1:  # mutual learning: fresh peers, other seeds
                        peers = [task.build_model(recipe.student, prepared, seed + 7919 * k) for k in range(1, stage.peers)]
                    model, history = self._train_stage(name, seed, model, teacher_arg, stage, spec, prepared, peers)
                    metrics = self._evaluate(model, prepared, teacher_logits)
                    if self.main:
                        save_weights(model, weights)
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
        results["teacher_gate"] = gate.to_dict()
        if assistants:
            results["assistants"] = assistants
        if generations:  # born-again: mean accuracy of each generation (the last is "student")
            results["generations"] = [statistics.fmean(g) for g in zip(*generations)]
            if "student" in results:
                results["generations"].append(results["student"][key])
        if self.main:
            if student_model is not None:
                save_weights(student_model, self.run_dir / "student.safetensors")
            write_json(self.run_dir / "results.json", results)
            from distill.report import write_report

            write_report(self.run_dir, results)
        self.state.wait_for_everyone()
        return results

    def _born_again(self, seed: int, signal, prepared: Prepared, teacher_logits) -> tuple[Any, list[float]]:
        """Generations 1..G-1 of born-again training; returns the signal for generation G."""
        recipe = self.recipe
        accuracies = []
        for g in range(1, recipe.distill.generations):
            name = f"student-gen{g}-seed{seed}"
            model = self._trained(name, recipe.student, recipe.distill.train or recipe.train, seed + 104729 * g,
                                  prepared, teacher=signal, stage=recipe.distill)
            key = self.task.primary_metric
            accuracies.append(self._evaluate(model, prepared, teacher_logits)[key])
            self.say(f"born-again generation {g} (seed {seed}): test {key} {_show(key, accuracies[-1])}")
            signal = LiveTeacher(model, precision=recipe.teacher.precision, device=recipe.teacher.device,
                                 feed=self.task.feed)
        return signal, accuracies

    def _summarise(self, teacher, teacher_metrics, per_seed, prepared) -> dict[str, Any]:
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
        results: dict[str, Any] = {
            "recipe": recipe.name,
            "task": self.task.name,
            "primary_metric": self.task.primary_metric,
            "data": recipe.data.name,
            "seeds": list(recipe.seeds),
            "threads": torch.get_num_threads(),
            "teacher": {**teacher_metrics, "agreement": 1.0, "per_seed": None, "model": recipe.teacher.model, **teacher_info},
        }
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
            results[role] = summary
        if self.task.report_metrics:  # more columns for the report (e.g. perplexity)
            results["report_metrics"] = list(self.task.report_metrics)
        results["verdict"] = verdict(results)
        return results


def _show(key: str, value: float) -> str:
    """A metric for the log: fractions in [0, 1] as percentages (accuracy, HR, NDCG, mAP)."""
    return f"{100 * value:.2f}%" if 0.0 <= value <= 1.0 and key != "perplexity" else f"{value:.4g}"


def verdict(results: dict[str, Any]) -> str:
    """One sentence: did distillation beat the student trained alone, beyond the seed spread?"""
    if "baseline" not in results or "student" not in results:
        return "no comparison: the baseline or the distilled student was not trained"
    key = results.get("primary_metric", "accuracy")
    b, s = results["baseline"], results["student"]
    gain = 100 * (s[key] - b[key])
    spread = 100 * max(b[f"{key}_std"], s[f"{key}_std"])
    n = len(b["per_seed"][key])
    if n < 2:
        return f"distilled − baseline = {gain:+.2f} points on one seed: run more seeds to judge"
    if gain > spread:
        return (f"distillation helped: {gain:+.2f} points over the student trained alone, "
                f"beyond the spread ({spread:.2f}) over {n} seeds")
    if gain < -spread:
        return (f"distillation hurt: {gain:+.2f} points against the student trained alone, "
                f"beyond the spread ({spread:.2f}) over {n} seeds")
    return (f"no clear effect: {gain:+.2f} points, within the spread ({spread:.2f}) over {n} seeds")


def run_recipe(recipe: Recipe, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run ``recipe`` in ``run_dir``; returns the results written to ``results.json``."""
    return Run(recipe, run_dir, **kwargs).execute()
