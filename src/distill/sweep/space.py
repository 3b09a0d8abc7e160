"""The searched space of ``distill sweep``: :class:`Dimension` (one recipe field and its
distribution), parsing a space (``--space`` file, ``--param PATH=SPEC``) against a recipe mapping,
:func:`default_space`, and applying a trial's values to a recipe mapping (:func:`apply_params`)."""

from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError

SEARCHABLE = ("student", "train", "distill")
SPEC_KEYS = ("low", "high", "log", "step", "type", "choices")
_MISSING = object()
_SPEC_FORM = "{low: .., high: ..} (with log: true, step: .., type: int|float) or {choices: [..]}"


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
