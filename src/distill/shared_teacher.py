"""One teacher for many runs: train (or load) it once and cache its outputs once.

A hyperparameter sweep (:mod:`distill.sweep`) or a capacity ladder (:mod:`distill.ladder`) trains
many students against the same teacher. :func:`share_teacher` trains the recipe's teacher once
(unless ``teacher.weights`` names a file), builds one teacher cache over the training split, and
returns the recipe pointed at both (``teacher.weights``, ``teacher.cache``), so that every student
run loads the teacher instead of training it and reads the cache instead of running it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.run_result import RunResult


@dataclass
class SharedTeacher:
    """Where the shared teacher's weights and cache are, and what was done to get them."""

    weights: str
    cache: str | None
    trained: bool
    score: float | None = None  # test score (the task's primary metric), when this call trained the teacher
    params: int | None = None
    notes: list[str] = field(default_factory=list)

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """A copy of recipe mapping ``data`` that loads this teacher (and reads its cache)."""
        data = copy.deepcopy(data)
        data["teacher"]["weights"] = self.weights
        data["teacher"]["train"] = None
        data["teacher"]["cache"] = self.cache
        return data

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "cache": self.cache, "trained": self.trained,
                "score": self.score, "params": self.params}


def cache_obstacle(data: dict[str, Any]) -> str | None:
    """Why a teacher cache cannot serve the recipe mapping ``data`` (None when it can)."""
    from distill.tasks.base import get_task

    task = get_task(data.get("task") or "classification")
    if not task.supports_cache:
        return f"task '{task.name}' has no teacher cache"
    if task.teacher_cache == "tokens":
        options = data.get("task_options") or {}
        if options.get("on_policy") or options.get("sequence_kd"):
            return "on-policy or sequence-level KD trains on new text, which no cache holds"
        return None
    augment = data["data"].get("augment") or {}
    if augment.get("shift"):
        return "data.augment.shift changes inputs after the teacher saw them"
    if data["distill"].get("mixup_alpha"):
        return "distill.mixup_alpha changes inputs after the teacher saw them"
    if (augment.get("crop_padding") or augment.get("flip")) and not data["data"].get("views"):
        return "crop/flip augmentation without data.views (set data.views, e.g. 4, to replay cached views)"
    return None


def share_teacher(
    data: dict[str, Any], work: str | Path, data_dir: str | Path | None = None, console=None,
    threads: int | None = None,
) -> SharedTeacher:
    """Train (or load) the teacher of recipe mapping ``data`` once and cache it under ``work``.

    ``data`` is a recipe as a mapping (``Recipe.model_dump(mode="json")``); its data section,
    validation split included, must be the one the students will use, since the cache is keyed by
    the training samples. A cache the recipe already names (``teacher.cache: PATH`` with
    ``teacher.weights``) is used as it is.
    """
    from distill.pipeline import run_recipe
    from distill.recipes import load_recipe
    from distill.stage import make_cache
    from distill.tasks.base import get_task

    work = Path(work)
    teacher = data["teacher"]
    if teacher.get("ensemble"):
        raise DistillError(
            "a teacher ensemble cannot be shared yet: cache it once with `distill cache` and give "
            "teacher.weights and teacher.cache"
        )
    notes: list[str] = []
    trained, score = False, None
    if teacher.get("weights") is None:
        solo = copy.deepcopy(data)
        solo["seeds"] = data["seeds"][:1]
        solo["threads"] = threads or data.get("threads")
        solo["teacher"]["cache"] = None
        solo["baseline"]["enabled"] = False
        solo["distill"]["enabled"] = False
        solo["assistants"] = []
        solo["evaluate"]["latency"] = False
        if console is not None:
            console.print(f"teacher: training it once in {work / 'teacher'}", markup=False)
        results = run_recipe(load_recipe(solo), work / "teacher", data_dir=data_dir, overwrite=True,
                             progress=False)
        weights = str(work / "teacher" / "teacher.safetensors")
        results = RunResult.parse(results)
        trained, score = True, results.teacher.metric(results.primary_metric)
        params = results.teacher.params
    else:
        weights = str(teacher["weights"])
        params = None
    cache = teacher.get("cache")
    if cache is not None and cache != "auto" and teacher.get("weights") is not None:
        return SharedTeacher(weights, str(cache), trained, score, params, notes)
    obstacle = cache_obstacle(data)
    if obstacle is not None:
        notes.append(f"no teacher cache ({obstacle}): every run runs the teacher live")
        return SharedTeacher(weights, None, trained, score, params, notes)
    shared = SharedTeacher(weights, str(work / "teacher-cache"), trained, score, params, notes)
    loadable = shared.apply(data)
    loadable["teacher"]["cache"] = None  # the cache is built from this recipe, not read
    recipe = load_recipe(loadable)
    task = get_task(recipe.task)
    prepared = task.prepare(recipe, data_dir)
    model = task.build_model(recipe.teacher, prepared, recipe.seeds[0])
    if params is None:
        shared.params = sum(p.numel() for p in model.parameters())
    make_cache(recipe, task, model, prepared, shared.cache)
    if console is not None:
        console.print(f"teacher cache: {shared.cache} ({len(prepared.train)} training samples)", markup=False)
    return shared


def _run_job(data: dict[str, Any], run_dir: str, data_dir: str | Path | None) -> RunResult:
    """One recipe run, in this process or a worker (its threads: the recipe's ``threads``)."""
    import torch

    from distill.pipeline import run_recipe
    from distill.recipes import load_recipe

    torch.set_num_threads(data.get("threads") or 1)
    return run_recipe(load_recipe(data), run_dir, data_dir=data_dir, overwrite=True, progress=False)


def run_recipes(
    jobs: dict[str, tuple[dict[str, Any], str | Path]], workers: int = 1, data_dir: str | Path | None = None,
    on_done=None,
) -> dict[str, RunResult]:
    """Run recipe mappings ``{name: (recipe, run_dir)}``, ``workers`` at a time in their own
    processes (each with its recipe's ``threads``); returns ``{name: results}`` in the given order.
    ``on_done(name, results)`` is called as each finishes."""
    import torch

    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        done = {}
        try:
            for name, (data, run_dir) in jobs.items():
                done[name] = _run_job(data, str(run_dir), data_dir)
                if on_done is not None:
                    on_done(name, done[name])
        finally:
            torch.set_num_threads(threads)
        return done
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, data, str(run_dir), data_dir): name for name, (data, run_dir) in jobs.items()}
        done = {}
        for future in as_completed(futures):
            name = futures[future]
            done[name] = future.result()
            if on_done is not None:
                on_done(name, done[name])
    return {name: done[name] for name in jobs}
