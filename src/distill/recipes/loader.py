"""Read a recipe: YAML file or preset name, ``--set key.sub=value`` overrides, validation."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

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


def format_validation_error(exc: ValidationError, where: str) -> str:
    errors = exc.errors()
    first = errors[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (check the spelling)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}: field '{path}': {message}{more}"


def validate_names(recipe: Recipe) -> None:
    """Check every named loss, model and data set exists before any work starts."""
    from distill.data import DATASETS
    from distill.losses import get_loss
    from distill.models import MODELS

    from distill.tasks.base import get_task

    task = get_task(recipe.task)  # an unknown task names the nearest ones (and registers its data)
    if task.data_names is None:
        DATASETS.get(recipe.data.name)
    elif recipe.data.name not in task.data_names:
        raise DistillError(
            f"unknown data set '{recipe.data.name}' for task {recipe.task}; choose {', '.join(task.data_names)}"
        )
    task.validate(recipe)
    members = recipe.teacher.ensemble.members if recipe.teacher.ensemble else []
    for spec in (recipe.teacher, recipe.student, *members, *recipe.assistants):
        if ":" not in spec.model and recipe.task == "classification":  # other tasks have their own zoos
            MODELS.get(spec.model)
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
    """Load, override and validate a recipe (a path, a preset name, or a mapping)."""
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), "recipe"
    else:
        data, where = read_yaml(source), f"recipe {source}"
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise DistillError(format_validation_error(exc, where)) from None
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
