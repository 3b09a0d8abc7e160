"""``distill ladder``: the capacity gap, measured: students of increasing size, alone and distilled.

    result = run_ladder(load_recipe("my.yaml"), scales=(0.25, 0.5, 1, 2, 4), out="ladders/my")
    result.rungs, result.finding.text, result.finding.assistant_yaml

Cho & Hariharan (2019, "On the Efficacy of Knowledge Distillation") found that how much a student
gains from a teacher depends on the gap between them: a student much smaller than its teacher can
gain little (or lose), and one close to the teacher gains little because it learns as much from
the labels. The ladder measures this for one recipe: the student's width is scaled (its ``width``,
``width_mult`` or ``hidden`` option; by default ×0.25, ×0.5, ×1, ×2, ×4), or other student models
are given, and every size is trained alone (the baseline stage) and distilled (the distill stage)
over the recipe's seeds, against one teacher trained once (or loaded) and cached once.

The table gives per size: parameters, latency (batch 1, one thread, measured in one process
after training), test accuracy (the task's primary metric) alone and distilled (mean ± std over
seeds) and the gain (the mean
of the per-seed differences, ± their std). :func:`capacity_finding` says where the gain peaks and
whether it falls again for the largest students, and when the smallest students gain little or
lose, proposes a teacher assistant between teacher and student (Mirzadeh et al. 2020; the recipe's
``assistants:``) with the YAML to paste. The teacher quality gate is off in these runs: a large
student that beats the teacher alone is a finding here, not an error.
"""

from __future__ import annotations

import copy
import csv
import inspect
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.run_result import RunResult

DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
WIDTH_KEYS = ("width", "width_mult", "hidden")


# ------------------------------------------------------------------------------ the sizes
def _factory_default(model: str, key: str) -> Any:
    if ":" in model:
        return None
    from distill.models import MODELS

    try:
        params = inspect.signature(MODELS.get(model)).parameters
    except (TypeError, ValueError):
        return None
    if key in params and params[key].default is not inspect.Parameter.empty:
        return params[key].default
    return None


def width_option(spec: dict[str, Any]) -> tuple[str, Any] | None:
    """The student's width option and its value (set in ``kwargs`` or the model's default):
    ``width`` or ``width_mult`` (a number) or ``hidden`` (a list of layer widths); None without one."""
    for key in WIDTH_KEYS:
        value = spec.get("kwargs", {}).get(key)
        if value is None:
            value = _factory_default(spec["model"], key)
        if key == "hidden" and isinstance(value, (list, tuple)) and value:
            return key, list(value)
        if key != "hidden" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, value
    return None


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, list):
        return [max(1, round(v * factor)) for v in value]
    if isinstance(value, int):
        return max(1, round(value * factor))
    return round(value * factor, 4)


def _describe(spec: dict[str, Any], key: str | None = None) -> str:
    if key is not None:
        value = spec["kwargs"][key]
        return f"{key} {'-'.join(map(str, value)) if isinstance(value, list) else value}"
    options = " ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in spec["kwargs"].items())
    return f"{spec['model']} {options}".strip()


def parse_student(text: str) -> dict[str, Any]:
    """``MODEL[,key=value...]`` (values as YAML), e.g. ``cnn,width=4,depth=2``, as a model spec."""
    model, *options = [part.strip() for part in text.split(",")]
    if not model:
        raise DistillError(f"--students expects MODEL[,key=value...], e.g. cnn,width=4,depth=2; got '{text}'")
    kwargs = {}
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key:
            raise DistillError(f"--students '{text}': '{option}' is not key=value")
        try:
            kwargs[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise DistillError(f"--students '{text}': value '{raw}' is not valid YAML") from None
    return {"model": model, "kwargs": kwargs}


def ladder_students(
    student: dict[str, Any], scales: list[float] | None = None, widths: list[Any] | None = None,
    students: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The ladder's students (``{model, kwargs, label}``): ``students`` as given, or the recipe's
    student with its width option set to each of ``widths`` or scaled by each of ``scales``."""
    if sum(x is not None for x in (scales, widths, students)) > 1:
        raise DistillError("give one of --scales, --widths and --students")
    if students is not None:
        if not students:
            raise DistillError("--students needs at least one model")
        out = []
        for spec in students:
            spec = {"model": spec["model"], "kwargs": dict(spec.get("kwargs") or {})}
            out.append({**spec, "label": _describe(spec)})
        return out
    option = width_option(student)
    if option is None:
        raise DistillError(
            f"student model '{student['model']}' has no width option ({', '.join(WIDTH_KEYS)}); "
            "give the sizes as models with --students, e.g. --students mlp,hidden=[64] mlp,hidden=[256]"
        )
    key, value = option
    if widths is not None:
        if not widths:
            raise DistillError("--widths needs at least one width")
        values = []
        for w in widths:
            ok = (all(isinstance(x, int) and x >= 1 for x in w) if isinstance(w, list)
                  else not isinstance(w, bool) and isinstance(w, (int, float)) and w > 0)
            if not ok:
                raise DistillError(f"--widths: {w!r} is not a positive width")
            values.append(w if isinstance(w, list) or key != "hidden" else [w] * len(value))
    else:
        scales = list(DEFAULT_SCALES if scales is None else scales)
        if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
            raise DistillError(f"--scales must be positive numbers, got {scales}")
        values = [_scaled(value, s) for s in scales]
    out, seen = [], set()
    for v in values:
        if repr(v) in seen:
            continue
        seen.add(repr(v))
        spec = {"model": student["model"], "kwargs": {**student.get("kwargs", {}), key: v}}
        out.append({**spec, "label": _describe(spec, key)})
    return out


# ------------------------------------------------------------------------------ the finding
@dataclass
class Finding:
    """Where the teacher's gain peaks, whether it falls again, and a teacher-assistant proposal."""

    peak: int
    falls: bool
    text: str
    advice: str | None = None
    assistant: dict[str, Any] | None = None
    assistant_yaml: str | None = None


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def _assistant(rungs: list[dict[str, Any]], teacher: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """A model between the teacher and the smallest student, and how it was chosen."""
    small = rungs[0]
    if teacher is not None and teacher.get("model") == small.get("model"):
        for key in ("width", "width_mult"):
            t, s = (teacher.get("kwargs") or {}).get(key), (small.get("kwargs") or {}).get(key)
            if isinstance(t, (int, float)) and isinstance(s, (int, float)) and t > s > 0:
                mid = math.sqrt(t * s)
                mid = round(mid) if isinstance(t, int) and isinstance(s, int) else round(mid, 3)
                if s < mid < t:
                    spec = {"model": small["model"], "kwargs": {**small["kwargs"], key: mid}}
                    return spec, f"{key} {mid}, the geometric mean of the teacher's {t} and the student's {s}"
    smaller = teacher is not None and teacher.get("params")
    candidates = [r for r in rungs[1:] if not smaller or r["params"] < teacher["params"]]
    if not candidates:
        candidates = rungs[1:]
    if teacher is not None and teacher.get("params"):
        target = math.sqrt(teacher["params"] * small["params"])
        pick = min(candidates, key=lambda r: abs(math.log(r["params"] / target)))
        why = f"{pick['label']} ({pick['params']:,} params), the size nearest the geometric mean of teacher and student"
    else:
        pick = max(candidates, key=lambda r: r["gain"])
        why = f"{pick['label']} ({pick['params']:,} params), where the gain peaked"
    return {"model": pick["model"], "kwargs": dict(pick["kwargs"])}, why


def capacity_finding(rungs: list[dict[str, Any]], teacher: dict[str, Any] | None = None) -> Finding:
    """The finding of a ladder from its rungs (each with ``label``, ``params``, ``gain`` and
    ``gain_std`` as fractions, ``model``, ``kwargs``), smallest first after sorting by ``params``.

    The gain *falls again* when the largest student's gain is below the peak's by more than the
    larger of their stds (any drop with one seed). A teacher assistant is advised when the peak is
    not at the smallest student and the smallest student's gain is negative or below half the peak.
    ``teacher`` (``model``, ``kwargs``, ``params``) lets the proposal interpolate the width option.
    """
    if not rungs:
        raise DistillError("the ladder has no results")
    rungs = sorted(rungs, key=lambda r: r["params"])
    gains = [r["gain"] for r in rungs]
    stds = [r.get("gain_std") or 0.0 for r in rungs]
    peak = max(range(len(rungs)), key=lambda i: (gains[i], -i))
    last = len(rungs) - 1
    p, g = rungs[peak], gains[peak]
    at = f"{p['label']} ({p['params']:,} params): {_points(g)} ± {100 * stds[peak]:.2f} points"
    falls = peak < last and g - gains[last] > max(stds[peak], stds[last])
    if g <= 0:
        text = (f"the teacher helps none of the students: distilled is no better than alone at any size (best: {at}); "
                "check the teacher (is it better than the students alone?) and the recipe's terms "
                "(temperature, weights: try `distill sweep`)")
    elif peak == last:
        text = (f"the gain from the teacher is largest for the largest student, {at}: no sign of a capacity gap "
                "in this range")
    elif falls:
        lr = rungs[last]
        where = "is largest for the smallest student" if peak == 0 else "peaks at"
        text = (f"the gain from the teacher {where} {at}, and falls again for larger students "
                f"({lr['label']}: {_points(gains[last])} ± {100 * stds[last]:.2f}): the capacity gap of "
                "Cho & Hariharan 2019, where larger students learn about as much from the labels alone")
    else:
        text = (f"the gain from the teacher peaks at {at}; the larger students' gains are within the spread "
                "of it, so no clear fall after the peak")
    finding = Finding(peak=peak, falls=falls, text=text)
    if len(rungs) > 1 and peak > 0 and g > 0 and (gains[0] <= 0 or gains[0] < 0.5 * g):
        spec, why = _assistant(rungs, teacher)
        finding.assistant = spec
        finding.assistant_yaml = yaml.safe_dump({"assistants": [spec]}, sort_keys=False, default_flow_style=None)
        finding.advice = (
            f"the smallest student ({rungs[0]['label']}) gains {_points(gains[0])} points from the teacher, against "
            f"{_points(g)} at {p['label']}: the gap to the teacher may be too wide to bridge in one step. Try a "
            f"teacher assistant between them (Mirzadeh et al. 2020): {why}; add to the recipe:"
        )
    return finding


# ------------------------------------------------------------------------------ the run
@dataclass
class LadderResult:
    """What :func:`run_ladder` measured and wrote (``out/ladder.json`` holds the same as JSON)."""

    out: Path
    rungs: list[dict[str, Any]]
    teacher: dict[str, Any]
    finding: Finding
    files: dict[str, str]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def rung_from_results(student: dict[str, Any], results: RunResult | dict[str, Any]) -> dict[str, Any]:
    """A ladder row from one size's ``results.json``: the test score (the task's primary metric,
    e.g. accuracy) alone and distilled, and the gain (the mean of the per-seed differences)."""
    results = RunResult.parse(results)
    key = results.primary_metric
    alone, distilled = results.baseline, results.student
    if alone is None or distilled is None:
        raise DistillError(f"size {student['label']}: the run trained no {'baseline' if alone is None else 'student'}")
    a, d = alone.per_seed[key], distilled.per_seed[key]
    diffs = [y - x for x, y in zip(a, d)]
    return {
        "label": student["label"], "model": student["model"], "kwargs": student["kwargs"], "metric": key,
        "alone": alone.metric(key), "alone_std": alone.std(key), "alone_per_seed": a,
        "distilled": distilled.metric(key), "distilled_std": distilled.std(key), "distilled_per_seed": d,
        "gain": statistics.fmean(diffs), "gain_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "agreement": distilled.metric("agreement"),
    }


def plot_ladder(rungs: list[dict[str, Any]], teacher: dict[str, Any], path: Path) -> Path:
    """Accuracy vs latency, alone and distilled (left); the gain vs parameters (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        EngFormatter,
        FormatStrFormatter,
        LogLocator,
        NullFormatter,
    )

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    metric = rungs[0].get("metric", "accuracy")
    timed = all(r.get("latency_ms") for r in rungs)
    lat = [r["latency_ms"] if timed else r["params"] for r in rungs]
    for key, label, color in (("alone", "student alone", "tab:gray"), ("distilled", "distilled", "tab:blue")):
        ax.errorbar(lat, [100 * r[key] for r in rungs], yerr=[100 * r[f"{key}_std"] for r in rungs],
                    fmt="o-", color=color, capsize=3, label=label)
    for r, x in zip(rungs, lat):
        ax.annotate(r["label"], (x, 100 * r["distilled"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    tx = teacher.get("latency_ms") if timed else teacher.get("params")
    if tx and teacher.get("score") is not None:
        ax.scatter([tx], [100 * teacher["score"]], marker="*", s=140, color="tab:red", label="teacher", zorder=3)
    xs = [x for x in lat + [tx or lat[0]] if x]
    if max(xs) > 3 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g") if timed else EngFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency, ms per sample (batch 1, 1 thread)" if timed else "parameters")
    ax.set_ylabel(f"test {metric} %")
    ax.set_title(f"{metric} vs {'latency' if timed else 'size'}")
    ax.legend(fontsize=8)
    params = [r["params"] for r in rungs]
    bx.errorbar(params, [100 * r["gain"] for r in rungs], yerr=[100 * r["gain_std"] for r in rungs],
                fmt="o-", color="tab:green", capsize=3)
    bx.axhline(0, color="0.5", lw=0.8)
    bx.set_xscale("log")
    bx.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    bx.xaxis.set_major_formatter(EngFormatter())
    bx.xaxis.set_minor_formatter(NullFormatter())
    bx.set_xlabel("student parameters")
    bx.set_ylabel(f"gain from the teacher, {metric} points")
    bx.set_title("distilled − alone (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_rows_csv(path: Path, rungs: list[dict[str, Any]]) -> None:
    keys = ["label", "model", "params", "latency_ms", "metric", "alone", "alone_std", "distilled", "distilled_std",
            "gain", "gain_std", "agreement"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rungs)


def run_ladder(
    recipe,
    *,
    scales: list[float] | None = None,
    widths: list[Any] | None = None,
    students: list[dict[str, Any]] | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    console=None,
) -> LadderResult:
    """Train every size of the ladder alone and distilled (see the module docstring) and write
    ``ladder.json``, ``ladder.csv`` and ``ladder.png`` in ``out`` (default ``ladders/<name>``).
    Sizes run in ``workers`` processes sharing the ``threads`` budget (default: free cores)."""
    import torch

    from distill.checkpoints import atomic_write
    from distill.measure import count_parameters, cpu_latency_ms
    from distill.pipeline import free_cores
    from distill.recipes import load_recipe
    from distill.recipes.schema import ModelSpec
    from distill.shared_teacher import run_recipes, share_teacher
    from distill.tasks.base import get_task

    if not recipe.distill.enabled:
        raise DistillError("the recipe's distill stage is disabled: the ladder compares alone and distilled")
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise DistillError(f"{name} must be at least 1, got {value}")
    data = recipe.model_dump(mode="json")
    sizes = ladder_students(data["student"], scales, widths, students)
    budget = threads or recipe.threads or free_cores()
    workers = max(1, min(len(sizes), workers or budget))
    per_worker = max(1, budget // workers)
    out = Path(out) if out is not None else Path("ladders") / recipe.name
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DistillError(f"ladder directory {out} already exists; pass --overwrite to replace it")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: console.print(text, markup=False)) if console is not None else (lambda text: None)
    started = time.perf_counter()
    notes = ["the teacher quality gate is off in the ladder's runs: a student that beats the teacher alone is "
             "a finding here"]

    # every size is built (and timed) before any training, so a bad size fails at once
    task = get_task(recipe.task)
    prepared = task.prepare(recipe, data_dir)
    example = task.latency_input(prepared)  # an input to time the models on
    repeats = recipe.evaluate.latency_repeats

    def measure(spec: dict[str, Any]) -> tuple[int, float | None]:
        model = task.build_model(ModelSpec(model=spec["model"], kwargs=spec["kwargs"]), prepared, 0)
        latency = cpu_latency_ms(model, example, repeats=repeats) if example is not None else None
        return count_parameters(model), latency

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for size in sizes:
            size["params"], size["latency_ms"] = measure(size)
        teacher_params, teacher_latency = measure({"model": recipe.teacher.model, "kwargs": recipe.teacher.kwargs})
    finally:
        torch.set_num_threads(previous)
    sizes.sort(key=lambda s: s["params"])
    say(f"ladder: {len(sizes)} students ({', '.join(s['label'] for s in sizes)}), each alone and distilled "
        f"over seeds {list(recipe.seeds)}; {workers} worker(s) x {per_worker} thread(s)")

    data["threads"] = per_worker
    shared = share_teacher(data, out, data_dir, console=console, threads=budget)
    notes += shared.notes
    base = shared.apply(data)
    jobs = {}
    for i, size in sorted(enumerate(sizes), key=lambda item: -item[1]["params"]):  # largest first
        job = copy.deepcopy(base)
        job["name"] = f"{recipe.name}-{_slug(size['label'])}"
        job["student"] = {"model": size["model"], "kwargs": size["kwargs"], "weights": None}
        job["baseline"]["enabled"] = True
        job["teacher"]["gate"]["enabled"] = False
        job["evaluate"]["latency"] = False
        load_recipe(job)  # a bad size fails before any training
        jobs[size["label"]] = (job, out / "sizes" / f"{i:02d}-{_slug(size['label'])}")

    def done(label: str, results: RunResult | dict[str, Any]) -> None:
        results = RunResult.parse(results)
        key = results.primary_metric
        say(f"{label}: test {key} alone {100 * results.baseline.metric(key):.2f}%, "
            f"distilled {100 * results.student.metric(key):.2f}%")

    runs = run_recipes(jobs, workers=workers, data_dir=data_dir, on_done=done)
    rungs = []
    for size in sizes:
        rung = rung_from_results(size, runs[size["label"]])
        rung.update(params=size["params"], latency_ms=size["latency_ms"])
        rungs.append(rung)
    first = RunResult.parse(next(iter(runs.values())))
    teacher_kwargs = dict(recipe.teacher.kwargs)
    option = width_option({"model": recipe.teacher.model, "kwargs": teacher_kwargs})
    if option is not None:
        teacher_kwargs.setdefault(*option)
    key = first.primary_metric
    teacher = {"model": recipe.teacher.model, "kwargs": teacher_kwargs, "params": teacher_params,
               "latency_ms": teacher_latency, "metric": key, "score": first.teacher.metric(key)}
    finding = capacity_finding(rungs, teacher)
    files = {"json": str(out / "ladder.json"), "csv": str(out / "ladder.csv"),
             "plot": str(plot_ladder(rungs, teacher, out / "ladder.png"))}
    write_rows_csv(out / "ladder.csv", rungs)
    result = LadderResult(
        out=out, rungs=rungs, teacher=teacher, finding=finding, files=files,
        settings={"seeds": list(recipe.seeds), "workers": workers, "threads_per_worker": per_worker,
                  "latency": "median of one forward pass at batch 1, 1 thread, measured after training in one process",
                  "shared_teacher": shared.to_dict(), "seconds": round(time.perf_counter() - started, 1)},
        notes=notes,
    )
    import json

    text = json.dumps(result.to_dict(), indent=2).encode()
    atomic_write(out / "ladder.json", lambda f: f.write(text))
    return result
