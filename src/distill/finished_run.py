"""What ``distill profile`` and ``distill export`` work on: a finished run, or a model by name.

A run directory made by ``distill run`` holds ``recipe.yaml`` (the resolved recipe), the teacher's
weights (``teacher.safetensors`` when the run trained it, else the recipe's ``teacher.weights``)
and the distilled student's (``student.safetensors``, the first seed's; each seed's is also in
``stages/student-seed<N>/student.safetensors``, next to the student in its ecosystem's format where
the task has one: ``hf/``, ``model2vec/``; see :meth:`FinishedRun.student_folder`).
:class:`FinishedRun` reads them back and rebuilds the models from the recipe; :class:`NamedModel`
is a zoo name (or ``package.module:callable``) with the input shape and class count given by the
caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import DistillError, nearest


@dataclass
class NamedModel:
    """A model built from the zoo: ``create_model(name, num_classes, input_shape, weights)``."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int = 10
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        from distill.models import create_model

        return create_model(self.name, self.num_classes, self.input_shape, weights=self.weights, **self.kwargs)


class FinishedRun:
    """The recipe, data and weight files of a run directory made by ``distill run``."""

    def __init__(self, path: str | Path, data_dir: str | Path | None = None) -> None:
        from distill.recipes import load_recipe

        self.path = Path(path)
        recipe_file = self.path / "recipe.yaml"
        if not recipe_file.is_file():
            raise DistillError(f"{self.path} is not a run directory: it has no recipe.yaml (made by `distill run`)")
        self.recipe = load_recipe(recipe_file)
        self.data_dir = data_dir

    @cached_property
    def task(self):
        """The run's task (``recipe.task``): how its data is loaded and its models are built."""
        from distill.tasks.base import get_task

        return get_task(self.recipe.task)

    @cached_property
    def prepared(self):
        """The run's data and loaders, as its task prepares them, loaded once."""
        return self.task.prepare(self.recipe, self.data_dir)

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape (the task's latency input without its batch dimension)."""
        example = self.task.latency_input(self.prepared)
        if example is None or not hasattr(example, "shape"):
            raise DistillError(
                f"task '{self.task.name}' gives no single-tensor model input, so its students cannot be "
                "profiled or exported from a run directory yet"
            )
        return tuple(example.shape[1:])

    def example_inputs(self, n: int):
        """``n`` real inputs to check an export on (``None``: the task has none; use random ones)."""
        return self.task.example_inputs(self.prepared, n)

    def labelled_test_batches(self):
        """``{"input", "target"}`` test batches for top-1 accuracy, or ``None`` outside classification."""
        return self.task.labelled_test_batches(self.prepared)

    def teacher_weights(self) -> Path:
        trained = self.path / "teacher.safetensors"
        if trained.is_file():
            return trained
        given = self.recipe.teacher.weights
        if given is not None:
            from distill.models.weights import SHIPPED, resolve_weights

            if given.startswith(SHIPPED):
                return resolve_weights(given)
            for candidate in (Path(given).expanduser(), self.path / given):
                if candidate.is_file():
                    return candidate
        raise DistillError(
            f"run {self.path} has no teacher weights: neither teacher.safetensors nor the recipe's "
            f"teacher.weights ({given}) exists"
        )

    def student_weights(self) -> Path:
        final = self.path / "student.safetensors"
        if final.is_file():
            return final
        for seed in self.recipe.seeds:
            staged = self.path / "stages" / f"student-seed{seed}" / "student.safetensors"
            if staged.is_file():
                return staged
        raise DistillError(
            f"run {self.path} has no distilled student weights (student.safetensors): did the run finish? "
            f"Continue it with `distill run RECIPE --out {self.path} --resume`"
        )

    def student_folder(self, seed: int | None = None) -> Path:
        """The distilled student of ``seed`` (default: the first seed that has one) as its task saves
        it for its own ecosystem: a Hugging Face ``save_pretrained`` folder (``.../hf``, for
        ``AutoModelFor*.from_pretrained`` and ``AutoTokenizer``) or a Model2Vec folder
        (``.../model2vec``, for ``model2vec.StaticModel.from_pretrained``)."""
        seeds = [seed] if seed is not None else list(self.recipe.seeds)
        for s in seeds:
            stage = self.path / "stages" / f"student-seed{s}"
            for name in ("hf", "model2vec"):
                if (stage / name).is_dir():
                    return stage / name
        raise DistillError(
            f"run {self.path} has no student folder (hf/ or model2vec/) under stages/student-seed"
            f"{seed if seed is not None else '<N>'}: only Hugging Face and static sentence students are saved so; "
            "others have their weights file (student.safetensors) and `distill export`"
        )

    def _build(self, spec, weights: Path | None) -> nn.Module:
        spec = spec.model_copy(update={"weights": str(weights) if weights is not None else None})
        return self.task.build_model(spec, self.prepared, 0)

    def teacher(self) -> nn.Module:
        return self._build(self.recipe.teacher, self.teacher_weights()).eval()

    def student(self) -> nn.Module:
        """The distilled student alone (no teacher, no adapters)."""
        return self._build(self.recipe.student, self.student_weights()).eval()

    def fresh_student(self) -> nn.Module:
        """An untrained student of the same architecture (to load an exported weights file into)."""
        return self._build(self.recipe.student, None).eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` (or ``3x32x32``) -> ``(3, 32, 32)``."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    shape = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    if not shape or any(d < 1 for d in shape):
        raise DistillError(f"--input-shape expects positive integers such as 3,32,32, got '{text}'")
    return shape


def resolve_source(
    text: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    weights: str | None = None,
    data_dir: str | Path | None = None,
) -> FinishedRun | NamedModel:
    """A run directory (it holds ``recipe.yaml``) or a model name; anything else is an error
    naming the nearest model names."""
    from distill.models import MODELS

    path = Path(text)
    if path.is_dir():
        return FinishedRun(path, data_dir)
    if ":" in text or text in MODELS:
        if input_shape is None:
            raise DistillError(f"model '{text}' needs --input-shape (e.g. --input-shape 3,32,32) and --classes")
        return NamedModel(text, input_shape, num_classes, weights)
    near = nearest(text, MODELS.names())
    raise DistillError(
        f"'{text}' is neither a run directory nor a model name; nearest models: {', '.join(near)}"
    )
