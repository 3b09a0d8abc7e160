"""The model zoo: models by name, your own models by import path, and weight files.

    model = create_model("resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    model = create_model("my_pkg.nets:TinyNet", num_classes=10, input_shape=(1, 28, 28))

Every zoo model maps ``[B, *input_shape]`` to logits ``[B, num_classes]`` and lists its main
stage outputs in ``model.feature_taps`` (dotted module paths, last one the pre-logit feature),
ready for :class:`distill.taps.Taps` and feature distillation.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from distill.errors import DistillError, nearest
from distill.models.registry import MODELS, ModelFactory
from distill.models.weights import count_params, load_weights, read_state_dict, save_weights

__all__ = [
    "MODELS",
    "ModelFactory",
    "count_params",
    "create_model",
    "load_weights",
    "model_names",
    "read_state_dict",
    "save_weights",
]

# The two arguments every factory receives positionally; the rest are the model's options.
_FIXED = ("num_classes", "input_shape")


def model_names() -> list[str]:
    """Names of the registered zoo models, sorted."""
    return MODELS.names()


def create_model(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model mapping ``[B, *input_shape]`` to logits ``[B, num_classes]``.

    ``name`` is a zoo name (see :func:`model_names`) or ``package.module:callable`` for your own
    model; the callable gets ``num_classes`` and ``input_shape`` only if its signature names
    them, plus ``kwargs``. ``weights`` is a file loaded strictly with :func:`load_weights`.
    Mistakes (unknown name, failed import, options the model does not take) raise
    :class:`DistillError` saying what would work.
    """
    classes = _as_int(num_classes)
    if classes is None or classes < 1:
        raise DistillError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = classes
    shape = _as_shape(input_shape)
    if ":" in name:
        try:
            model = _create_user_model(name, num_classes, shape, kwargs)
        except TypeError as exc:  # the user's callable wants arguments distill does not pass
            raise DistillError(
                f"calling your model '{name}' failed: {exc}; it is called with num_classes and "
                "input_shape (when its signature names them) plus the recipe's kwargs"
            ) from None
    else:
        factory = MODELS.get(name)
        _check_options(f"model '{name}'", factory, kwargs, skip=_FIXED)
        model = factory(num_classes, shape, **kwargs)
    if not isinstance(model, nn.Module):
        raise DistillError(f"model '{name}' returned a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model


def _as_int(value: object) -> int | None:
    """``value`` as a plain int if it is integral (numpy and torch ints too), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _as_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    dims = [_as_int(d) for d in input_shape] if isinstance(input_shape, Sequence) else []
    shape = tuple(d for d in dims if d is not None and d >= 1)
    if not dims or isinstance(input_shape, str) or len(shape) != len(dims):
        raise DistillError(
            f"input_shape must be a non-empty list of positive integers such as [3, 32, 32], "
            f"got {input_shape!r}"
        )
    return shape


def _describe(params: list[inspect.Parameter]) -> str:
    if not params:
        return "none"
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)


def _check_options(
    what: str, fn: Callable[..., Any], kwargs: dict[str, Any], skip: Sequence[str] = ()
) -> None:
    """Raise a :class:`DistillError` naming the accepted options when ``fn`` cannot take
    ``kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    options = [p for p in params if p.name not in skip and p.kind in named]
    accepted = {p.name for p in options}
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            near = nearest(key, accepted, n=1)
            if near:
                hints.append(f"'{key}' (did you mean '{near[0]}'?)")
            else:
                hints.append(f"'{key}'")
        raise DistillError(
            f"{what} does not take option {', '.join(hints)}; it accepts: {_describe(options)}"
        )
    required = [p.name for p in options if p.default is p.empty and p.name not in kwargs]
    if required:
        raise DistillError(
            f"{what} needs option {', '.join(required)}; it accepts: {_describe(options)}"
        )


def _import_module(name: str) -> Any:
    """``importlib.import_module(name)``; when that fails, once more with the working directory
    first on ``sys.path`` (the ``distill`` console script does not put it there, unlike
    ``python -m``), so ``my_nets:Student`` finds ``./my_nets.py`` without ``PYTHONPATH=.``."""
    try:
        return importlib.import_module(name)
    except ImportError as first:
        cwd = os.getcwd()
        if _top_level_missing(first, name) and not any(_same_dir(p, cwd) for p in sys.path):
            sys.path.insert(0, cwd)
            importlib.invalidate_caches()
            try:
                return importlib.import_module(name)
            except ImportError:
                sys.path.remove(cwd)
                raise first from None
        raise


def _top_level_missing(err: ImportError, name: str) -> bool:
    """The import failed because the module (or a package above it) is not found, not because
    something it imports is missing."""
    missing = getattr(err, "name", None)
    return isinstance(err, ModuleNotFoundError) and (missing == name or name.startswith(f"{missing}."))


def _same_dir(entry: str, cwd: str) -> bool:
    try:
        return os.path.realpath(entry or os.curdir) == os.path.realpath(cwd)
    except (TypeError, ValueError):
        return False


CALLABLE_CONTRACT = (
    "the callable receives the keyword arguments num_classes and input_shape (when its signature "
    "names them) plus the recipe's kwargs, and returns an nn.Module"
)


def _import_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise DistillError(
            f"model '{spec}': a custom model is written 'package.module:callable', "
            f"e.g. 'my_project.nets:make_student'; {CALLABLE_CONTRACT}"
        )
    try:
        obj: Any = _import_module(module_name)
    except ImportError as err:
        raise DistillError(
            f"model '{spec}': cannot import module '{module_name}' ({err}); is it installed, on "
            f"PYTHONPATH, or a file in the working directory ({os.getcwd()})? {CALLABLE_CONTRACT[0].upper()}"
            f"{CALLABLE_CONTRACT[1:]}"
        ) from err
    for i, part in enumerate(attr_path.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = nearest(part, names, n=3)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise DistillError(
                f"model '{spec}': '{owner}' has no attribute '{part}'{hint}"
            ) from None
    if not callable(obj):
        raise DistillError(
            f"model '{spec}': '{attr_path}' is a {type(obj).__name__}, not callable; {CALLABLE_CONTRACT}"
        )
    return obj


def _create_user_model(
    spec: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]
) -> Any:
    fn = _import_callable(spec)
    call_kwargs = dict(kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    named = {
        n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key, value in (("num_classes", num_classes), ("input_shape", input_shape)):
        if key in named and key not in call_kwargs:
            call_kwargs[key] = value
    _check_options(f"model '{spec}'", fn, call_kwargs)
    return fn(**call_kwargs)


def _register_all() -> None:
    """Import every module of this package: each zoo module registers its models (``MODELS``; the
    detection and ranking zoos their own registries) as it is imported, so a new model family is one
    new file, no list to edit."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
