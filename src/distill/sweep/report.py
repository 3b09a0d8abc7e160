"""What ``distill sweep`` reports: the trials table (``trials.csv``), readable field names,
parameter importances and the plots (importance, accuracy against latency with the Pareto front),
the final comparison of the default and the best recipe on the test split, and atomic writes of
the files (``best.yaml``, ``space.yaml``, ``sweep.json``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from distill.run_result import RunResult
from distill.sweep.space import _MISSING, Dimension, _walk, apply_params
from distill.sweep.trial import require_optuna


def trial_rows(study, dims: list[Dimension]) -> list[dict[str, Any]]:
    """One row per trial: number, state, validation score, latency, size, epochs, time, values."""
    rows = []
    for t in study.trials:
        a = t.user_attrs
        row = {"number": t.number, "state": t.state.name, "val_score": a.get("val_score"),
               "latency_ms": a.get("latency_ms"), "params": a.get("params"), "epochs": a.get("epochs"),
               "seconds": round(a["seconds"], 2) if "seconds" in a else None, "default": bool(a.get("default")),
               "error": a.get("error")}
        row.update({d.path: t.params.get(d.path) for d in dims})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def short_names(paths: list[str], data: dict[str, Any] | None = None) -> dict[str, str]:
    """Readable labels for field paths: ``soft temperature`` for a term's field (its name from
    recipe mapping ``data``), ``student width``, else the last part (more where two would clash)."""
    labels = {}
    for path in paths:
        parts = path.split(".")
        term = _walk(data, parts[:3]) if data is not None and parts[1:2] == ["terms"] else _MISSING
        if isinstance(term, dict) and term.get("name"):
            labels[path] = f"{term['name']} {parts[-1]}"
        elif parts[0] == "student" and len(parts) > 1:
            labels[path] = f"student {' '.join(parts[2:] if parts[1] == 'kwargs' else parts[1:])}"
        else:
            for k in range(1, len(parts) + 1):
                label = ".".join(parts[-k:])
                if sum(".".join(p.split(".")[-k:]) == label for p in paths) == 1:
                    break
            labels[path] = label
    return labels


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, score) that no other point beats on both, by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def param_importances(study) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances (Hutter et al. 2014) of the searched fields for the validation score,
    computed by Optuna; None and the reason when there are too few finished trials."""
    optuna = require_optuna()
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return None, f"parameter importance needs 3 finished trials, got {len(complete)}"
    try:
        return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))), None
    except (RuntimeError, ValueError) as exc:
        return None, f"parameter importance could not be computed: {exc}"


def plot_importance(importances: dict[str, float], path: Path, data: dict[str, Any] | None = None,
                    metric: str = "accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = short_names(list(importances), data)
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.45 * len(names) + 1.2))
    ax.barh([labels[n] for n in names], [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for validation {metric} (fANOVA, sums to 1)")
    ax.set_title("which searched fields mattered")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(rows: list[dict[str, Any]], path: Path, best: int | None, metric: str = "accuracy") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE" and r["latency_ms"] is not None]
    if not done:
        return None
    points = [(r["latency_ms"], 100 * r["val_score"]) for r in done]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=18, color="0.6", label="trial")
    fx, fy = zip(*sorted(points[i] for i in front))
    ax.plot(fx, fy, "o-", color="tab:red", ms=5, drawstyle="steps-post", label="Pareto front")
    for r, p in zip(done, points):
        if r["default"]:
            ax.scatter(*p, s=80, facecolors="none", edgecolors="black", label="default recipe")
        if r["number"] == best:
            ax.scatter(*p, s=120, marker="*", color="tab:orange", zorder=3, label="best")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("student latency, ms per sample (batch 1)")
    ax.set_ylabel(f"validation {metric} %")
    ax.set_title(f"{metric} vs latency over the trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def _summary(results: RunResult | dict[str, Any]) -> dict[str, Any]:
    """The distilled student of a run's results: its test score (primary metric) over seeds."""
    results = RunResult.parse(results)
    key, s = results.primary_metric, results.student
    return {"metric": key, "score": s.metric(key), "score_std": s.std(key), "per_seed": s.per_seed[key],
            "agreement": s.metric("agreement"), "params": s.params, "latency_ms": s.latency_ms}



def comparison_params(best_params: dict[str, Any], defaults: dict[str, Any], dims: list[Dimension]) -> dict[str, dict]:
    """The recipes the final comparison runs, as parameter changes to the searched recipe.

    ``default`` (no change) and ``best`` (the best trial's values), and ``best_settings`` when the best
    trial also changed the student (a ``student.*`` field): its other values on the default student.
    A bigger student found by the search then does not pass for better settings: ``best_settings``
    against ``default`` is the like-for-like gain. ``best`` is left out when it is the default.
    """
    runs: dict[str, dict] = {"default": {}}
    if all(best_params.get(d.path) == defaults.get(d.path) for d in dims) and len(defaults) == len(dims):
        return runs
    runs["best"] = dict(best_params)
    student = [d.path for d in dims if d.path.startswith("student.")]
    changed = any(p in best_params and best_params[p] != defaults.get(p, _MISSING) for p in student)
    settings = {k: v for k, v in best_params.items() if k not in student}
    settings_changed = any(v != defaults.get(k, _MISSING) for k, v in settings.items())
    if changed and settings_changed and all(p in defaults for p in student):
        runs["best_settings"] = settings
    return runs


def _compare(base, best_params, defaults, dims, out, workers, data_dir, recipe, say) -> dict[str, Any]:
    """The recipes of :func:`comparison_params`, each run on every seed by the pipeline (baseline
    off, the shared teacher and cache) and evaluated on the test split the same way."""
    from distill.shared_teacher import run_recipes

    runs = comparison_params(best_params, defaults, dims)
    jobs = {}
    for name, params in runs.items():
        job = apply_params(base, params)
        slug = name.replace("_", "-")
        job["name"] = f"{recipe.name}-{slug}"
        job["baseline"]["enabled"] = False
        jobs[name] = (job, out / "compare" / slug)
    say(f"comparison on the test split: {', '.join(jobs)} recipe(s) over seeds {list(recipe.seeds)}")
    results = run_recipes(jobs, workers=workers, data_dir=data_dir)
    summary = {name: _summary(r) for name, r in results.items()}
    same = "best" not in runs
    if same:
        summary["best"] = summary["default"]
    d, b = summary["default"], summary["best"]
    summary["gain_points"] = 100 * (b["score"] - d["score"])
    if "best_settings" in summary:  # the default student with the best settings: like for like
        summary["best_settings"]["params_changed"] = runs["best_settings"]
        summary["gain_points_same_student"] = 100 * (summary["best_settings"]["score"] - d["score"])
    summary["seeds"] = list(recipe.seeds)
    summary["same_recipe"] = same
    return summary


def atomic_text(path: Path, text: str) -> None:
    from distill.checkpoints import atomic_write

    atomic_write(Path(path), lambda f: f.write(text.encode()))
