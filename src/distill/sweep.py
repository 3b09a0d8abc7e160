"""``distill sweep``: search a recipe's hyperparameters with Optuna, on the validation split.

    result = run_sweep(load_recipe("my.yaml"), trials=40, workers=2, out="sweeps/my")
    result.best_recipe, result.trials, result.comparison

What is searched (the *space*): override paths of the recipe, as for ``--set``, each with a
distribution, given as a mapping (a YAML file for ``--space``, or ``--param PATH=SPEC``)::

    distill.terms.1.params.temperature: {low: 1, high: 8, log: true}
    train.lr: {low: 0.0002, high: 0.01, log: true}
    student.kwargs.width: {low: 4, high: 16, step: 4}     # int: the recipe's value is an int
    distill.terms.1.loss: [kd, dkd]                       # choices (also {choices: [...]})

``type: int|float`` is inferred from the recipe's current value (or the model's or loss's default)
unless given. Without a space, :func:`default_space` searches the temperature of every term that
has one, the weights of the teacher terms (relative to the first label term, which stays fixed),
the learning rate of the distilled student, and the student's ``width``/``depth`` (``width_mult``)
when its model takes them.

How a trial runs: the distilled student of the trial's recipe is trained on the training split
(first seed) and scored by its task's primary metric (accuracy for classification) on the
validation split (``data.val_fraction``; the sweep sets 0.1 when the recipe has none). Each epoch's
validation score is reported to Optuna, and a trial below the median of earlier trials at the same
epoch is stopped early (``MedianPruner``). The
teacher is trained once (or loaded from ``teacher.weights``) and cached once; every trial reads that
cache. The test split is not used to select anything: only after the search are the default recipe
and the best trial's recipe run by :func:`distill.run_recipe` (every seed) and evaluated on it.

Trials run in ``workers`` processes that share one Optuna study in a journal file in the output
folder, each process with ``threads // workers`` torch threads.
"""

from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.errors import DistillError

SEARCHABLE = ("student", "train", "distill")
SPEC_KEYS = ("low", "high", "log", "step", "type", "choices")
_MISSING = object()
_SPEC_FORM = "{low: .., high: ..} (with log: true, step: .., type: int|float) or {choices: [..]}"


def require_optuna():
    """The ``optuna`` module, or an error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise DistillError("distill sweep needs Optuna: pip install distill[search]") from None
    return optuna


# ------------------------------------------------------------------------------ the space
@dataclass(frozen=True)
class Dimension:
    """One searched recipe field: its override path and its distribution."""

    path: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial) -> Any:
        """The value an Optuna ``trial`` proposes for this field."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def ends(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_spec(self) -> dict[str, Any]:
        """The mapping this dimension is written as in a space file."""
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        spec: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        spec["type"] = self.kind
        return spec


def _walk(data: Any, parts: list[str]) -> Any:
    node = data
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _signature_default(fn, name: str, what: str, path: str, skip: int = 0) -> Any:
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return _MISSING
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if name in named:
        default = named[name].default
        return _MISSING if default is inspect.Parameter.empty else default
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return _MISSING
    accepted = ", ".join(n for n in named if n not in ("num_classes", "input_shape")) or "none"
    raise DistillError(f"search space '{path}': {what} has no option '{name}'; it accepts: {accepted}")


def current_value(data: dict[str, Any], path: str) -> Any:
    """The value at ``path`` in recipe mapping ``data``: set there, or the default of the model
    option (``...kwargs.NAME``) or loss parameter (``...params.NAME``) it names; ``_MISSING`` when
    neither. Raises when a model or loss has no such option."""
    parts = path.split(".")
    value = _walk(data, parts)
    if value is not _MISSING or len(parts) < 3:
        return value
    owner = _walk(data, parts[:-2])
    if not isinstance(owner, dict):
        return _MISSING
    if parts[-2] == "kwargs" and isinstance(owner.get("model"), str) and ":" not in owner["model"]:
        from distill.models import MODELS

        return _signature_default(MODELS.get(owner["model"]), parts[-1], f"model '{owner['model']}'", path)
    if parts[-2] == "params" and isinstance(owner.get("loss"), str):
        from distill.losses import get_loss

        spec = get_loss(owner["loss"])
        if parts[-1] not in spec.param_names():
            raise DistillError(
                f"search space '{path}': loss '{spec.name}' has no parameter '{parts[-1]}'; it accepts: "
                f"{', '.join(spec.param_names()) or 'none'}"
            )
        fn = spec.fn.__init__ if spec.module else spec.fn
        return _signature_default(fn, parts[-1], f"loss '{spec.name}'", path)
    return _MISSING


def set_value(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (``a.b.0.c``, as for ``--set``) in recipe mapping ``data`` to ``value``, in place."""
    from distill.recipes.loader import apply_override

    try:
        apply_override(data, f"{path}={json.dumps(value)}")
    except DistillError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise DistillError(f"search space '{path}': {reason}") from None


def _number(value: Any, key: str, path: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DistillError(f"search space '{path}': {key} must be a number, got {value!r}")
    return value


def parse_dimension(path: Any, spec: Any, data: dict[str, Any]) -> Dimension:
    """One entry of a space: ``path`` (override path) and ``spec`` (distribution), checked."""
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise DistillError(f"search space: '{path}' is not a field path such as train.lr")
    if path.split(".")[0] not in SEARCHABLE:
        raise DistillError(
            f"search space '{path}': only {', '.join(f'{r}.*' for r in SEARCHABLE)} fields can be searched "
            "(every trial shares one teacher, one data split and one seed)"
        )
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise DistillError(f"search space '{path}': expected {_SPEC_FORM}, got {spec!r}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise DistillError(f"search space '{path}': unknown key '{unknown[0]}'; use {', '.join(SPEC_KEYS)}")
    current = current_value(data, path)
    if "choices" in spec:
        choices = spec["choices"]
        extra = [k for k in spec if k != "choices"]
        if extra:
            raise DistillError(f"search space '{path}': choices cannot be combined with {', '.join(extra)}")
        if not isinstance(choices, list) or not choices:
            raise DistillError(f"search space '{path}': choices must be a non-empty list")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise DistillError(
                    f"search space '{path}': choices must be numbers, strings, booleans or null, got {choice!r}"
                )
        return Dimension(path, "categorical", choices=tuple(choices))
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise DistillError(f"search space '{path}': {' and '.join(missing)} missing; expected {_SPEC_FORM}")
    low, high = _number(spec["low"], "low", path), _number(spec["high"], "high", path)
    kind = spec.get("type")
    if kind is None:
        kind = "int" if isinstance(current, int) and not isinstance(current, bool) else "float"
    if kind not in ("int", "float"):
        raise DistillError(f"search space '{path}': type must be int or float, got {kind!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise DistillError(f"search space '{path}': log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, "step", path)
        if step <= 0:
            raise DistillError(f"search space '{path}': step must be positive, got {step}")
        if log:
            raise DistillError(f"search space '{path}': log and step cannot be combined (Optuna samples one "
                               "or the other)")
    if kind == "int":
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and value != int(value):
                raise DistillError(f"search space '{path}': {key} must be an integer for type int, got {value}")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
    else:
        low, high = float(low), float(high)
    if not low < high:
        raise DistillError(f"search space '{path}': low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise DistillError(f"search space '{path}': log: true needs low > 0, got {low}")
    return Dimension(path, kind, low, high, log, step)


def parse_space(space: Any, data: dict[str, Any]) -> list[Dimension]:
    """The dimensions of ``space`` (a mapping ``path: distribution``) for recipe mapping ``data``.

    Every path and distribution is checked, and the recipe is validated with each end of each
    range (or each choice), so a bad space fails before any training with a one-line error."""
    from distill.recipes import load_recipe

    if not isinstance(space, dict) or not space:
        raise DistillError(f"search space: expected a mapping of field paths to {_SPEC_FORM}")
    dims = [parse_dimension(path, spec, data) for path, spec in space.items()]
    for dim in dims:
        for value in dim.ends():
            trial = copy.deepcopy(data)
            set_value(trial, dim.path, value)
            try:
                load_recipe(trial)
            except DistillError as exc:
                raise DistillError(f"search space '{dim.path}' = {value!r}: {exc}") from None
    return dims


def read_space(source: str | Path | dict | None, params: list[str] | tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A space mapping from a YAML file (``--space``) and ``PATH=SPEC`` strings (``--param``)."""
    space: dict[str, Any] = {}
    if isinstance(source, dict):
        space.update(source)
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise DistillError(f"search space file {source} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise DistillError(f"search space file {source} is not valid YAML{at}") from None
        if not isinstance(loaded, dict):
            raise DistillError(f"search space file {source} must map field paths to {_SPEC_FORM}")
        space.update(loaded)
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DistillError("--param expects PATH=SPEC, e.g. 'train.lr={low: 0.0001, high: 0.01, log: true}', "
                               f"got '{item}'")
        try:
            space[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise DistillError(f"--param {key}: '{raw}' is not valid YAML") from None
    return space or None


def _terms_anchor(terms: list[dict[str, Any]]) -> int:
    """The term whose weight stays fixed: the first label term, else the first term."""
    from distill.losses import get_loss

    for i, term in enumerate(terms):
        if not get_loss(term["loss"]).needs_teacher and term.get("weight", 1.0) > 0:
            return i
    return 0


def default_space(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The space searched when none is given (see the module docstring), for recipe mapping ``data``."""
    from distill.losses import get_loss

    space: dict[str, dict[str, Any]] = {}
    terms = data["distill"]["terms"]
    anchor = _terms_anchor(terms)
    for i, term in enumerate(terms):
        spec = get_loss(term["loss"])
        path = f"distill.terms.{i}.params.temperature"
        if "temperature" in spec.param_names():
            t = current_value(data, path)
            t = float(t) if isinstance(t, (int, float)) and t > 0 else 4.0
            space[path] = {"low": min(1.0, t), "high": max(8.0, t), "log": True}
        weight = term.get("weight", 1.0)
        if spec.needs_teacher and i != anchor and weight > 0:
            space[f"distill.terms.{i}.weight"] = {"low": weight / 10, "high": weight * 10, "log": True}
    train = "distill.train" if data["distill"].get("train") else "train"
    lr = float(_walk(data, [*train.split("."), "lr"]) or 1e-3)
    space[f"{train}.lr"] = {"low": lr / 5, "high": lr * 5, "log": True}
    for name in ("width", "width_mult", "depth"):
        path = f"student.kwargs.{name}"
        try:
            value = current_value(data, path)
        except DistillError:  # the model has no such option
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name == "depth" and isinstance(value, int):
            space[path] = {"low": max(1, value - 1), "high": value + 1}
        elif isinstance(value, int):
            space[path] = {"low": max(1, value // 2), "high": max(2, 2 * value), "log": True}
        else:
            space[path] = {"low": value / 2, "high": value * 2, "log": True}
    return space


def apply_params(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of recipe mapping ``data`` with each ``path: value`` of ``params`` set."""
    data = copy.deepcopy(data)
    for path, value in params.items():
        set_value(data, path, value)
    return data


# ------------------------------------------------------------------------------ one trial
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
    from distill.pipeline import open_cache
    from distill.signals import LiveTeacher

    key = json.dumps(["signal", recipe.task, recipe.teacher.model_dump(mode="json"),
                      recipe.data.model_dump(mode="json")], sort_keys=True)
    if key not in _CONTEXT:
        teacher = task.build_model(recipe.teacher, prepared, recipe.seeds[0])
        if recipe.teacher.cache is not None:
            _CONTEXT[key] = open_cache(recipe, teacher, prepared, recipe.teacher.cache)
        else:
            _CONTEXT[key] = LiveTeacher(teacher, precision=recipe.teacher.precision, device=recipe.teacher.device,
                                        feed=task.feed)
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

    The teacher is loaded from ``teacher.weights`` (and read from ``teacher.cache`` when set); the
    test split is never evaluated. ``on_epoch_end(row)`` gets each epoch's metrics
    (``val_<primary metric>`` among them) and may return True to stop, as :class:`distill.Trainer`
    documents."""
    from distill.objective import Distiller
    from distill.pipeline import stage_transform, terms_from, train_config
    from distill.tasks.base import get_task
    from distill.trainer import Trainer

    check_searchable(recipe)
    if recipe.teacher.weights is None:
        raise DistillError("a sweep trial loads its teacher: set teacher.weights (run_sweep does)")
    task = get_task(recipe.task)
    prepared = _prepared(recipe, data_dir)
    if getattr(prepared, "val_loader", None) is None:
        raise DistillError("a sweep trial is scored on the validation split: set data.val_fraction (e.g. 0.1)")
    seed = recipe.seeds[0]
    stage = recipe.distill
    spec = stage.train or recipe.train
    student = task.build_model(recipe.student, prepared, seed)
    distiller = Distiller(student, _teacher_signal(recipe, task, prepared), terms_from(stage), feed=task.feed,
                          num_samples=len(prepared.train))
    loader = task.train_loader(recipe, prepared, spec.batch_size, seed)
    transform = stage_transform(recipe, stage)
    first = next(iter(loader))
    report = distiller.dry_run(transform(first, torch.Generator().manual_seed(0)) if transform else first)
    if report.problems:
        raise DistillError("; ".join(report.problems))

    def evaluate(model) -> dict[str, float]:
        return task.evaluate(model.student, prepared, None, split="val")

    trainer = Trainer(distiller, loader, train_config(spec, seed, False), evaluate=evaluate, name="trial",
                      batch_transform=transform, on_epoch_end=on_epoch_end)
    history = trainer.fit()
    model = distiller.export_student()
    key = task.primary_metric
    score = float(task.evaluate(model, prepared, None, split="val")[key])
    return TrialOutcome(score, key, history, model, bool(getattr(trainer, "stopped_early", False)))


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


# ------------------------------------------------------------------------------ the study
def _storage(path: Path):
    optuna = require_optuna()
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        return optuna.storages.JournalStorage(optuna.storages.JournalFileStorage(str(path)))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def default_pruner(trials: int):
    """Optuna's median pruner: stop a trial whose validation score at an epoch (from the second
    on) is below the median of earlier trials at that epoch, once a few trials have finished."""
    optuna = require_optuna()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, trials // 4)), n_warmup_steps=2)


def _announce(study, trial) -> None:
    attrs = trial.user_attrs
    if trial.state.name == "COMPLETE":
        what = f"validation score {trial.value:.4f}, {attrs.get('latency_ms', float('nan')):.3f} ms"
    elif trial.state.name == "PRUNED":
        what = f"pruned after epoch {attrs.get('epochs')} (validation score {attrs.get('val_score') or 0:.4f})"
    else:
        what = f"failed: {attrs.get('error', 'see the log')}"
    print(f"trial {trial.number}: {what}", flush=True)


def _search(journal: str, study_name: str, n_trials: int, base: dict[str, Any], dims: list[Dimension],
            data_dir, threads: int, sampler_seed: int, pruner, repeats: int, verbose: bool) -> None:
    """One worker: ``n_trials`` trials of the shared study (in this process or a spawned one)."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
        study = optuna.load_study(study_name=study_name, storage=_storage(Path(journal)), sampler=sampler,
                                  pruner=pruner)
        study.optimize(lambda trial: _objective(trial, base, dims, data_dir, repeats), n_trials=n_trials,
                       catch=(DistillError,), callbacks=[_announce] if verbose else None)
    finally:
        torch.set_num_threads(previous)


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


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The distilled student of a run's results: its test score (primary metric) over seeds."""
    key = results.get("primary_metric", "accuracy")
    s = results["student"]
    return {"metric": key, "score": s[key], "score_std": s[f"{key}_std"], "per_seed": s["per_seed"][key],
            "agreement": s.get("agreement"), "params": s["params"], "latency_ms": s.get("latency_ms")}


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
