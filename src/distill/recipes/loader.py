"""Read a recipe: YAML file or preset name, ``--set key.sub=value`` overrides, validation."""

from __future__ import annotations

import copy
import difflib
import types
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from distill.errors import DistillError
from distill.recipes.schema import Recipe


def preset_names() -> list[str]:
    folder = resources.files("distill.recipes") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, or in the preset named ``source``."""
    path = Path(source)
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif str(source) in preset_names():
        text = (resources.files("distill.recipes") / "presets" / f"{source}.yaml").read_text()
        where = f"preset '{source}'"
    else:
        raise DistillError(
            f"recipe '{source}' is neither a file nor a preset; presets: {', '.join(preset_names())}"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DistillError(f"{where} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise DistillError(f"{where} must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to nested ``data`` in place; ``value`` is parsed as YAML.

    Integer parts index lists (``distill.terms.1.weight=0.5``).
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise DistillError(f"--set expects key.sub=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise DistillError(f"--set {key}: value '{raw}' is not valid YAML") from None
    apply_override_value(data, key, value)


def apply_override_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at the dotted path ``key`` of nested ``data`` in place (sections are created)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise DistillError(f"--set {key}: '{where}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise DistillError(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section")


def _flatten(annotation: Any) -> list[Any]:
    """The types an annotation allows: ``Annotated`` and ``Optional`` unwrapped, unions split."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _flatten(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _flatten(arg)]
    return [] if annotation is type(None) else [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _walk(loc: tuple) -> tuple[list[str], list[type[BaseModel]]]:
    """The parts of ``loc`` a user wrote (pydantic's union tags such as ``list[str]`` dropped), and
    the models that hold its last part (for an unknown field: where its valid names come from)."""
    current: list[Any] = [Recipe]
    shown: list[str] = []
    holders: list[type[BaseModel]] = [Recipe]
    for i, part in enumerate(loc):
        holders = [t for t in current if _is_model(t)]
        following: list[Any] = []
        for t in current:
            origin, args = get_origin(t), get_args(t)
            if _is_model(t) and isinstance(part, str) and part in t.model_fields:
                following += _flatten(t.model_fields[part].annotation)
            elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
                following += _flatten(args[0]) if args else [Any]
            elif origin is dict and isinstance(part, str):
                following += _flatten(args[1]) if len(args) == 2 else [Any]
        if following or (i == len(loc) - 1 and holders):
            shown.append(str(part))  # a field, an index, or the unknown field's own name
        current = following or current  # an unmatched part is a union member's tag: skip it
    return shown, holders


def _close_fields(name: str, holders: list[type[BaseModel]]) -> tuple[list[str], list[str]]:
    """The valid field names at an unknown field's place, and those close to ``name``."""
    fields = sorted({f for model in holders for f, info in model.model_fields.items()
                     if not info.exclude})  # excluded fields (train.seed, ...) are set by the run
    return fields, difflib.get_close_matches(str(name), fields, n=3, cutoff=0.6)


def _echo(error: dict, inherited: Mapping[tuple, set[str]], messages: Mapping[tuple, set[str]]) -> bool:
    """Whether ``error`` is in a stage's ``train:`` and repeats the top-level ``train:``'s own error
    about a value the stage took over from it (see :func:`merge_stage_trains`)."""
    loc = tuple(error["loc"])
    for stage, keys in inherited.items():
        rest = loc[len(stage):]
        if loc[: len(stage)] == stage and (not rest or rest[0] in keys):
            if error["msg"] in messages.get(("train", *rest), ()):
                return True
    return False


def format_validation_error(
    exc: ValidationError, where: str, inherited: Mapping[tuple, set[str]] | None = None
) -> str:
    """Every problem of ``exc`` on one line: ``where: path: problem; path: problem``.

    An unknown field names the nearest valid ones; a "Field required" that the misspelling of the
    same field explains is not repeated. ``inherited`` (from :func:`merge_stage_trains`) drops the
    errors of a stage's ``train:`` that only repeat the top-level ``train:``'s, which are reported.
    """
    errors = exc.errors()
    messages: dict[tuple, set[str]] = {}
    for e in errors:
        messages.setdefault(tuple(e["loc"]), set()).add(e["msg"])
    errors = [e for e in errors if not _echo(e, inherited or {}, messages)]
    explained: set[tuple] = set()  # missing fields that a misspelled sibling stands for
    for e in errors:
        if e["type"] == "extra_forbidden" and e["loc"]:
            _, holders = _walk(tuple(e["loc"]))
            _, close = _close_fields(e["loc"][-1], holders)
            explained.update((*e["loc"][:-1], name) for name in close[:1])
    problems: dict[str, list[str]] = {}
    for e in errors:
        loc = tuple(e["loc"])
        if e["type"] == "missing" and loc in explained:
            continue
        shown, holders = _walk(loc)
        if e["type"] == "extra_forbidden" and loc:
            fields, close = _close_fields(loc[-1], holders)
            message = (f"unknown field; nearest: {', '.join(close)}" if close
                       else f"unknown field; valid here: {', '.join(fields)}")
        else:
            message = e["msg"]
            for prefix in ("Value error, ", "Assertion failed, "):
                message = message.removeprefix(prefix)
        listed = problems.setdefault(".".join(shown), [])
        if message not in listed:
            listed.append(message)
    parts = [f"{path}: {' or '.join(msgs)}" if path else " or ".join(msgs) for path, msgs in problems.items()]
    count = f"{len(parts)} problems: " if len(parts) > 1 else ""
    return f"{where}: {count}{'; '.join(parts)}"


def _stage_trains(data: dict[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
    """``(loc, section)`` of every mapping whose ``train:`` is a partial override of ``train:``:
    baseline, distill and each assistant (the teacher and ensemble members have their own)."""
    found = [((name,), data.get(name)) for name in ("baseline", "distill")]
    assistants = data.get("assistants")
    if isinstance(assistants, list):
        found += [(("assistants", i), a) for i, a in enumerate(assistants)]
    return [(loc, section) for loc, section in found if isinstance(section, dict)]


def merge_stage_trains(data: dict[str, Any]) -> dict[tuple, set[str]]:
    """Fill each stage's ``train:`` (baseline, distill, assistants) from the top-level ``train:``, in place.

    A stage's ``train:`` overrides only the fields it gives; the rest are the recipe's ``train:``
    (not :class:`TrainSpec`'s defaults), so ``--set distill.train.epochs=5`` changes the distilled
    student's epochs and nothing else. A stage without ``train:`` (or ``train: null``) keeps using
    ``train:`` itself. Returns ``{loc of the stage's train: keys taken over}``, for error reporting.
    """
    top = data.get("train")
    if not isinstance(top, dict):
        return {}
    inherited: dict[tuple, set[str]] = {}
    for loc, section in _stage_trains(data):
        own = section.get("train")
        if isinstance(own, dict):
            inherited[(*loc, "train")] = {key for key in top if key not in own}
            section["train"] = {**top, **own}
    return inherited


def validate_names(recipe: Recipe) -> None:
    """Check every named loss, model and data set exists before any work starts."""
    from distill.data import DATASETS
    from distill.losses import get_loss

    from distill.tasks.base import get_task

    task = get_task(recipe.task)  # an unknown task names the nearest ones (and registers its data)
    if task.data_names is None:
        DATASETS.get(recipe.data.name)
    elif recipe.data.name not in task.data_names:
        raise DistillError(
            f"unknown data set '{recipe.data.name}' for task {recipe.task}; choose {', '.join(task.data_names)}"
        )
    task.data_options(recipe)  # unknown, missing or mistyped data.options: one line, before any work
    task.validate(recipe)
    members = recipe.teacher.ensemble.members if recipe.teacher.ensemble else []
    from distill.models.weights import SHIPPED, resolve_weights

    for spec in (recipe.teacher, recipe.student, *members, *recipe.assistants):
        if spec.weights is not None and spec.weights.startswith(SHIPPED):
            resolve_weights(spec.weights)  # an unknown or damaged shipped teacher fails here, before any work
    for spec in (recipe.teacher, recipe.student, *members, *recipe.assistants):
        task.check_model_name(spec.model)  # each task knows its own zoo
    for stage in ("baseline", "distill"):
        for term in getattr(recipe, stage).terms:
            loss = get_loss(term.loss)
            try:
                loss.check_params(term.params)
            except DistillError as exc:
                raise DistillError(f"{stage} term '{term.name}': {exc}") from None
    for term in recipe.baseline.terms:
        if get_loss(term.loss).needs_teacher:
            raise DistillError(
                f"baseline term '{term.name}' uses loss '{term.loss}', which needs a teacher; the "
                "baseline is the student trained without one"
            )


def load_recipe(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe (a path, a preset name, or a mapping).

    The ``--set`` overrides are applied first, then each stage's ``train:`` is merged over the
    top-level ``train:`` (see :func:`merge_stage_trains`), then the whole is validated.
    """
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), "recipe"
    else:
        data, where = read_yaml(source), f"recipe {source}"
    for assignment in overrides:
        apply_override(data, assignment)
    inherited = merge_stage_trains(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise DistillError(format_validation_error(exc, where, inherited)) from None
    if "terms" not in (data.get("baseline") or {}):  # the baseline trains on the task's own labels
        from distill.recipes.schema import TermSpec
        from distill.tasks.base import get_task

        try:
            recipe.baseline.terms = [TermSpec(**get_task(recipe.task).label_term)]
        except DistillError:
            pass  # an unknown task: validate_names says so
    validate_names(recipe)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
