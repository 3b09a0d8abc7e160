"""The whole ``distill sweep``: :func:`run_sweep` checks the space, shares the teacher, runs the
study's trials in worker processes, writes the reports and the best recipe, and runs the final
comparison; :class:`SweepResult` is what it returns."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.sweep.report import (
    _compare, atomic_text, param_importances, plot_importance, plot_pareto, trial_rows, write_csv,
)
from distill.sweep.space import _MISSING, apply_params, current_value, default_space, parse_space, read_space
from distill.sweep.study import _search, _storage, default_pruner
from distill.sweep.trial import check_searchable, require_optuna


@dataclass
class SweepResult:
    """What :func:`run_sweep` found and wrote (``out/sweep.json`` holds the same as JSON)."""

    out: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    best_recipe: Path
    space: dict[str, dict[str, Any]]
    importances: dict[str, float] | None
    comparison: dict[str, Any] | None
    files: dict[str, str]
    teacher: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"], out["best_recipe"] = str(self.out), str(self.best_recipe)
        return out



def run_sweep(
    recipe,
    trials: int,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    space: dict[str, Any] | str | Path | None = None,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    pruner=None,
    seed: int = 0,
    compare: bool = True,
    overwrite: bool = False,
    verbose: bool = False,
    console=None,
) -> SweepResult:
    """Search ``recipe`` with ``trials`` Optuna trials (see the module docstring) and write, in ``out``
    (default ``sweeps/<name>``): ``best.yaml``, ``trials.csv``, ``importance.png``, ``pareto.png``,
    ``space.yaml``, ``sweep.json`` and the study journal. ``pruner`` replaces :func:`default_pruner`;
    ``compare`` runs the default and the best recipe on every seed and evaluates both on the test
    split (after the search). ``threads`` is the torch thread budget shared by the ``workers``."""
    optuna = require_optuna()
    from distill.pipeline import free_cores
    from distill.recipes import load_recipe, recipe_to_yaml
    from distill.shared_teacher import share_teacher
    from distill.tasks.base import get_task

    check_searchable(recipe)
    metric = get_task(recipe.task).primary_metric
    if trials < 1:
        raise DistillError(f"--trials must be at least 1, got {trials}")
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise DistillError(f"{name} must be at least 1, got {value}")
    budget = threads or recipe.threads or free_cores()
    workers = min(trials, workers or budget)
    per_worker = max(1, budget // workers)
    notes: list[str] = []
    data = recipe.model_dump(mode="json")
    if data["data"]["val_fraction"] == 0:
        data["data"]["val_fraction"] = 0.1
        notes.append("the recipe has no validation split: the sweep set data.val_fraction=0.1 and selects on it "
                     "(the test split is used only for the final comparison)")
    data["threads"] = per_worker
    dims = parse_space(read_space(space) or default_space(data), data)  # before anything is written

    out = Path(out) if out is not None else Path("sweeps") / recipe.name
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DistillError(f"sweep directory {out} already exists; pass --overwrite to replace it")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: console.print(text, markup=False)) if console is not None else (lambda text: None)
    started = time.perf_counter()

    atomic_text(out / "space.yaml", yaml.safe_dump({d.path: d.to_spec() for d in dims}, sort_keys=False))

    shared = share_teacher(data, out, data_dir, console=console, threads=budget)
    notes += shared.notes
    base = shared.apply(data)

    journal = out / "study.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=recipe.name, storage=_storage(journal), direction="maximize")
    defaults = {}
    for dim in dims:
        value = current_value(data, dim.path)
        if value is not _MISSING and dim.contains(value):
            defaults[dim.path] = value
    if defaults:  # trial 0: the recipe's own values (those the space contains)
        study.enqueue_trial(defaults, user_attrs={"default": len(defaults) == len(dims)})
    if len(defaults) < len(dims):
        notes.append("the space does not contain the recipe's value of "
                     f"{', '.join(sorted(set(d.path for d in dims) - set(defaults)))}: trial 0 samples it")
    pruner = pruner if pruner is not None else default_pruner(trials)
    say(f"sweep: {trials} trials of {len(dims)} fields, {workers} worker(s) x {per_worker} thread(s); study {journal}")
    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    args = [(str(journal), recipe.name, n, base, dims, data_dir, per_worker, seed + i, pruner,
             recipe.evaluate.latency_repeats, verbose) for i, n in enumerate(shares)]
    if workers == 1:
        _search(*args[0])
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for future in [pool.submit(_search, *a) for a in args]:
                future.result()
    search_seconds = time.perf_counter() - started

    study = optuna.load_study(study_name=recipe.name, storage=_storage(journal))
    rows = trial_rows(study, dims)
    write_csv(out / "trials.csv", rows)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = [r["error"] for r in rows if r["error"]]
        raise DistillError("no trial finished" + (f"; the first error: {errors[0]}" if errors else
                                                  " (every trial was pruned)"))
    best_trial = max(complete, key=lambda t: (t.value, -t.number))
    best_data = apply_params(data, best_trial.params)
    best_data["threads"] = recipe.threads
    best_recipe = load_recipe(best_data)
    header = (f"# best of {len(rows)} trials of `distill sweep` on {recipe.name}: validation {metric} "
              f"{best_trial.value:.4f} (trial {best_trial.number})\n")
    atomic_text(out / "best.yaml", header + recipe_to_yaml(best_recipe))
    files = {"best_recipe": str(out / "best.yaml"), "trials": str(out / "trials.csv"),
             "space": str(out / "space.yaml"), "study": str(journal)}

    importances, why = param_importances(study)
    if importances:
        files["importance_plot"] = str(plot_importance(importances, out / "importance.png", data, metric))
    elif why:
        notes.append(why)
    pareto = plot_pareto(rows, out / "pareto.png", best_trial.number, metric)
    if pareto is not None:
        files["pareto_plot"] = str(pareto)

    best = {"number": best_trial.number, "val_score": best_trial.value, "params": best_trial.params,
            "latency_ms": best_trial.user_attrs.get("latency_ms"),
            "student_params": best_trial.user_attrs.get("params")}
    default_rows = [r for r in rows if r["default"] and r["state"] == "COMPLETE"]
    if default_rows:
        best["default_val_score"] = default_rows[0]["val_score"]
    comparison = None
    if compare:
        comparison = _compare(base, best_trial.params, defaults, dims, out, workers, data_dir, recipe, say)
    result = SweepResult(
        out=out, trials=rows, best=best, best_recipe=out / "best.yaml", space={d.path: d.to_spec() for d in dims},
        importances=importances, comparison=comparison, files=files, teacher=shared.to_dict(),
        settings={"metric": metric, "trials": trials, "workers": workers, "threads_per_worker": per_worker,
                  "seed": seed,
                  "val_fraction": data["data"]["val_fraction"], "pruner": type(pruner).__name__,
                  "search_seconds": round(search_seconds, 1), "seconds": round(time.perf_counter() - started, 1)},
        notes=notes,
    )
    atomic_text(out / "sweep.json", json.dumps(result.to_dict(), indent=2, default=str))
    return result

