"""The loss contract: every registered loss, on the example its own file registers, is a finite
float32 scalar; is (near) zero when the student equals its teacher and positive otherwise; sends a
finite, nonzero gradient to every student tensor (and to a module loss's parameters); accepts bf16
students and teachers and computes in float32; ignores the order of the batch; and runs through
``Distiller.dry_run`` with no problems.

Tests are parametrized over ``LOSSES.names()``, so a new loss is checked without editing this file.
A loss exempt from a property says why where it is registered (``register_loss(..., exempt=...)``);
that loss is then not collected for that property (the reasons are checked to exist). Also here: the package
registers every loss file, and no loss module imports anything above its floor.

Checks of particular values (against formulas written from the papers) live in the tests of each
method: test_losses.py, test_methods_losses*.py, test_methods_modules.py, test_token_losses.py,
test_detection.py.
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill import Distiller, Term
from distill.losses import LOSSES, get_loss, register_loss
from distill.losses.registry import CONTRACT_PROPERTIES, LossSpec

pytestmark = pytest.mark.fast

LOSSES_DIR = Path(__file__).resolve().parents[1] / "src" / "distill" / "losses"
# the library's losses: those its package registers (not ones a test or a user registers elsewhere,
# e.g. tests/test_multi_teacher.py's, which may be imported first)
NAMES = [n for n in LOSSES.names() if get_loss(n).fn.__module__.startswith("distill.losses.")]
SEEDS = range(3)  # the value checks draw a few examples; the others one


# -- helpers -------------------------------------------------------------------------------------


def _map(fn, value):
    """``fn`` applied to every tensor in ``value`` (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return value


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value``, in order."""
    found: list[torch.Tensor] = []
    _map(found.append, value)
    return found


def _shape(value):
    """What a module loss is constructed from: a shape, or a list of shapes for several taps."""
    return [tuple(v.shape) for v in value] if isinstance(value, list) else tuple(value.shape)


def _leaf(value, dtype: torch.dtype | None = None):
    """A copy of the floating tensors in ``value`` that requires grad (cast to ``dtype`` first)."""
    return _map(lambda t: t.detach().to(dtype or t.dtype).requires_grad_(True) if t.is_floating_point() else t, value)


def _example(spec: LossSpec, seed: int = 0) -> dict:
    ex = spec.example(torch.Generator().manual_seed(seed))
    missing = [k for k in (*spec.inputs, *spec.needs) if k not in ex]
    assert not missing, f"the example registered for '{spec.name}' gives no {', '.join(missing)}"
    return ex


def _module(spec: LossSpec, ex: dict, student):
    """A module loss built as the objective builds it: ``cls(student_shape, teacher_shape, **needs)``."""
    torch.manual_seed(0)  # the same weights for every evaluation of one test
    teacher_shape = _shape(ex["teacher"]) if spec.needs_teacher else None
    return spec.fn(_shape(student), teacher_shape, **{n: ex[n] for n in spec.needs})


def _evaluate(spec: LossSpec, ex: dict, student=None, teacher=None, module=None) -> torch.Tensor:
    """The loss of ``ex``'s inputs, with ``student`` and ``teacher`` replaced when given."""
    values = {**ex, "student": ex["student"] if student is None else student,
              "teacher": ex.get("teacher") if teacher is None else teacher}
    args = [values[kind] for kind in spec.inputs]
    if spec.module:
        module = module if module is not None else _module(spec, ex, values["student"])
        return module(*args)
    return spec.fn(*args)


def _value(loss: torch.Tensor) -> float:
    return float(loss.detach())


def bound_by(prop: str) -> list[str]:
    """The registered losses a property applies to (a loss's exemption, with its reason, lives in
    its own file; the exempt ones are not collected rather than skipped)."""
    return [name for name in NAMES if get_loss(name).exemption(prop) is None]


# -- the package finds its losses ------------------------------------------------------------------


def _registered_in(path: Path) -> set[str]:
    """The names a loss file registers: the first argument of each ``@register_loss(...)``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_loss":
                    names.add(deco.args[0].value)
    return names


def test_every_loss_file_in_the_package_is_registered():
    # the package imports every module in it (nothing else imports a new loss file), so each name a
    # file registers is in the registry, pointing at that file
    expected = {}
    for path in sorted(LOSSES_DIR.glob("*.py")):
        for name in _registered_in(path):
            expected[name] = f"distill.losses.{path.stem}"
    assert len(expected) >= 30
    assert sorted(expected) == NAMES
    assert {name: get_loss(name).fn.__module__ for name in NAMES} == expected


ALLOWED_BELOW_LOSSES = ("distill.errors", "distill.registry", "distill.adapters", "distill.taps", "distill.boxes",
                        "distill.losses")


def _distill_imports(path: Path) -> set[str]:
    """Every ``distill`` module a file imports (at any depth: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "distill"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "distill":
            found.add(node.module)
    return found


def _allowed(module: str, floors: tuple[str, ...]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in floors)


def test_losses_and_boxes_import_nothing_above_them():
    # losses are a low floor: tasks, models, data, pipeline (and the `distill` package, which imports
    # the objective) sit above them and import them
    for path in sorted(LOSSES_DIR.glob("*.py")):
        above = sorted(m for m in _distill_imports(path) if not _allowed(m, ALLOWED_BELOW_LOSSES))
        assert not above, f"{path.name} imports {', '.join(above)}"
    boxes = LOSSES_DIR.parent / "boxes.py"
    assert _distill_imports(boxes) <= {"distill.errors"}


def test_an_exemption_must_name_a_contract_property_and_say_why():
    # register_loss checks its arguments before it registers anything
    with pytest.raises(ValueError, match="no contract property 'zero'"):
        register_loss("never_registered", exempt={"zero": "typo"})
    with pytest.raises(ValueError, match="say why"):
        register_loss("never_registered", exempt={"zero_at_match": " "})
    assert "never_registered" not in LOSSES
    assert set(CONTRACT_PROPERTIES) == {"zero_at_match", "batch_order"}  # each has its test below


# -- the contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_value_is_a_finite_float32_scalar(name):
    spec = get_loss(name)
    for seed in SEEDS:
        value = _evaluate(spec, _example(spec, seed))
        assert isinstance(value, torch.Tensor) and value.shape == () and value.dtype == torch.float32
        assert torch.isfinite(value), (seed, _value(value))


@pytest.mark.parametrize("name", bound_by("zero_at_match"))
def test_zero_when_the_student_equals_its_teacher_and_positive_otherwise(name):
    spec = get_loss(name)
    for seed in SEEDS:
        ex = _example(spec, seed)
        matched = _map(torch.clone, ex.get("student_at_match", ex["teacher"]))
        assert _value(_evaluate(spec, ex, student=matched)) == pytest.approx(0.0, abs=1e-5), seed
        assert _value(_evaluate(spec, ex)) > 1e-4, seed


@pytest.mark.parametrize("name", NAMES)
def test_a_finite_nonzero_gradient_reaches_every_student_tensor(name):
    spec = get_loss(name)
    ex = _example(spec)
    student = _leaf(ex["student"])
    module = _module(spec, ex, student) if spec.module else None
    _evaluate(spec, ex, student=student, module=module).backward()
    for i, x in enumerate(_tensors(student)):
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"student tensor {i}"
        assert x.grad.abs().sum() > 0, f"student tensor {i} gets a zero gradient"
    for pname, p in (module.named_parameters() if module is not None else ()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_the_float32_value_of_the_rounded_inputs(name):
    # as under mixed precision: the models' outputs (student, teacher) are bf16, the batch's labels
    # are not; the loss computes in float32 and its gradient comes back in the student's dtype
    spec = get_loss(name)
    ex = _example(spec)
    low = _leaf(ex["student"], torch.bfloat16)
    teacher = _map(lambda t: t.bfloat16() if t.is_floating_point() else t, ex.get("teacher"))
    module = _module(spec, ex, low) if spec.module else None
    value = _evaluate(spec, ex, student=low, teacher=teacher, module=copy.deepcopy(module))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    rounded = _evaluate(spec, ex, student=_map(torch.Tensor.float, low), teacher=_map(torch.Tensor.float, teacher),
                        module=copy.deepcopy(module))
    assert _value(value) == pytest.approx(_value(rounded), rel=1e-5, abs=1e-6)
    value.backward()
    for x in _tensors(low):
        assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", bound_by("batch_order"))
def test_the_order_of_the_batch_does_not_matter(name):
    spec = get_loss(name)
    ex = _example(spec)
    batch = _tensors(ex["student"])[0].shape[0]
    order = torch.arange(batch).roll(1)  # every sample moves
    permuted = {**ex, **{kind: _map(lambda t: t[order], ex[kind]) for kind in spec.inputs}}
    module = _module(spec, ex, ex["student"]) if spec.module else None
    first = _value(_evaluate(spec, ex, module=copy.deepcopy(module)))
    second = _value(_evaluate(spec, permuted, module=copy.deepcopy(module)))
    assert second == pytest.approx(first, rel=1e-5, abs=1e-6)


class Emitter(nn.Module):
    """A model whose taps ``out.0``, ``out.1``, ... output the given tensors, held as parameters
    (so a loss on them trains it); its own output is the first."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.values = nn.ParameterList(nn.Parameter(t.clone()) for t in tensors)
        self.out = nn.ModuleList(nn.Identity() for _ in tensors)

    def forward(self, _input: torch.Tensor) -> torch.Tensor:
        return [tap(value) for tap, value in zip(self.out, self.values)][0]


def _taps(value) -> str | list[str]:
    return [f"out.{i}" for i in range(len(value))] if isinstance(value, list) else "out.0"


@pytest.mark.parametrize("name", NAMES)
def test_the_objective_feeds_it_and_its_dry_run_finds_no_problem(name):
    spec = get_loss(name)
    ex = _example(spec)
    student = Emitter(_tensors(ex["student"]))
    teacher = Emitter(_tensors(ex["teacher"])) if spec.needs_teacher else None
    term = Term("t", name, student=_taps(ex["student"]), teacher=_taps(ex["teacher"]) if teacher else "logits")
    distiller = Distiller(student, teacher, [term], num_samples=ex.get("num_samples"))
    batch = {"input": torch.zeros(len(_tensors(ex["student"])[0]), 1), "target": ex.get("labels"),
             "index": ex.get("index"), "mask": ex.get("mask")}
    report = distiller.dry_run(batch)
    assert report.problems == []
    assert math.isfinite(report.terms["t"])
    if not spec.module:  # the same value as the loss called by hand: the objective feeds each input kind
        assert report.terms["t"] == pytest.approx(_value(_evaluate(spec, ex)), rel=1e-5, abs=1e-7)
