"""Data sets by name, and their options, typed.

A data set builder is ``fn(data_dir: pathlib.Path, *, option=default, ...) -> DataSplits``,
registered with :func:`register_builder`. ``data_dir`` is where downloaded files are stored
(``--data-dir`` or ``DISTILL_DATA``, default ``~/.cache/distill/data``); builders that generate data
offline ignore it. A builder's keyword-only parameters are its options (a recipe's
``data.options``); their annotations and defaults make its :class:`DataOptions` model, so a recipe
with an unknown, missing or mistyped option is refused in one line before any work starts.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from distill.data.types import DataSplits
from distill.errors import DistillError
from distill.registry import Registry

DatasetBuilder = Callable[..., DataSplits]
DATASETS: Registry[DatasetBuilder] = Registry("data set")


class DataOptions(BaseModel):
    """A data set's ``data.options``, typed: built from a builder's keyword-only parameters by
    :func:`register_builder`, or declared by a task for the data sets it reads itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def options_model(name: str, fn: Callable) -> type[DataOptions]:
    """The :class:`DataOptions` of builder ``fn``: one field per keyword-only parameter, with its
    annotation (``Any`` where it has none) and default (required where it has none)."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (_annotation(fn, p), default)
    title = "".join(part.capitalize() for part in name.replace("_", "-").split("-")) + "Options"
    return create_model(title, __base__=DataOptions, **fields)


def _annotation(fn: Callable, param: inspect.Parameter) -> Any:
    """``param``'s annotation resolved in ``fn``'s module (each on its own: one name that does not
    resolve, such as the return type's, leaves the others typed); ``Any`` when it has none or it
    does not resolve."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return Any
    def holder() -> None: ...

    holder.__annotations__ = {param.name: annotation}
    try:
        return typing.get_type_hints(holder, globalns=fn.__globals__)[param.name]
    except (NameError, TypeError, SyntaxError):  # a name that does not resolve here: the option stays untyped
        return Any


def parse_data_options(name: str, model: type[DataOptions], given: dict | None) -> dict:
    """``given`` (a recipe's ``data.options`` for data set ``name``) checked against ``model``: the
    options given, with their values converted to the declared types (a YAML list for a tuple,
    ``3`` for ``3.0``), or a :class:`DistillError` in one line."""
    given = dict(given or {})
    try:
        parsed = model.model_validate(given)
    except ValidationError as exc:
        errors = exc.errors()
        accepted = list(model.model_fields)
        unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            raise DistillError(
                f"data set '{name}' has no option {', '.join(repr(u) for u in unknown)}; "
                f"accepted options: {', '.join(accepted) or 'none'}"
            ) from None
        missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
        if missing:
            raise DistillError(f"data set '{name}' needs the option {', '.join(missing)} (data.options.{missing[0]})") from None
        first = errors[0]
        field = str(first["loc"][0])
        message = first["msg"].removeprefix("Value error, ")
        raise DistillError(
            f"data.options.{field} (data set '{name}'): {message[:1].lower() + message[1:]} (given: {given.get(field)!r})"
        ) from None
    values = dict(parsed)  # fields and extras by name (getattr would return a method for `copy`, `json`, ...)
    return {key: values[key] for key in given}


def register_builder(name: str) -> Callable:
    """Register a builder ``fn(data_dir, *, option=default, ...)`` under ``name``.

    Its options are checked and converted by its :class:`DataOptions` model (``builder.Options``)
    on every call: an unknown option lists the accepted ones, a missing one is named, a value of the
    wrong type is refused in one line (instead of a bare ``TypeError`` deep in the builder).
    """

    def wrap(fn: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        model = options_model(name, fn)

        @functools.wraps(fn)
        def builder(data_dir: Path, **options) -> DataSplits:
            return fn(Path(data_dir), **parse_data_options(name, model, options))

        builder.Options = model
        builder.accepted_options = list(model.model_fields)
        DATASETS.register(name, builder)
        return builder

    return wrap


class _AnyOptions(DataOptions):
    """The options of a builder registered without :func:`register_builder`: not checked here."""

    model_config = ConfigDict(extra="allow", frozen=True)


def data_options_model(name: str) -> type[DataOptions]:
    """The typed options of the registered data set ``name``."""
    return getattr(DATASETS.get(name), "Options", _AnyOptions)


def default_data_dir() -> Path:
    """``$DISTILL_DATA`` or ``~/.cache/distill/data``."""
    env = os.environ.get("DISTILL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill" / "data"


def load_dataset(name: str, data_dir: str | Path | None = None, **options) -> DataSplits:
    """Build the data set registered as ``name``."""
    builder = DATASETS.get(name)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    return builder(root, **options)
