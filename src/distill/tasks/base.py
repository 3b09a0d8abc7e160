"""What a task plugs into a run: its data, how models are built and fed, how they are evaluated.

The pipeline (teacher → baseline → distilled → report) is the same for every field; a task says
what differs. A recipe picks one with ``task: NAME`` (default ``classification``):

    @TASKS.register("ranking")
    class RankingTask(Task): ...

A task's methods get the recipe and the object its :meth:`Task.prepare` returned, and nothing in
the pipeline looks inside that object except through the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from distill.errors import DistillError
from distill.registry import Registry
from distill.signals import Feed, default_feed


class TaskOptions(BaseModel):
    """A task's ``task_options``, typed: a task declares its own subclass (fields with defaults) as
    :attr:`Task.Options`; unknown names and wrong values are refused in one line."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(model: type[TaskOptions], given: dict | None, task: str) -> TaskOptions:
    """``given`` (a recipe's ``task_options``) as ``model``, or a :class:`DistillError` in one line."""
    try:
        return model.model_validate(dict(given or {}))
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            accepted = ", ".join(model.model_fields) or "none"
            raise DistillError(f"task_options: {task} has no option {', '.join(unknown)}; accepted: {accepted}") from None
        first = errors[0]
        field = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error":
            raise DistillError(f"task_options: {message}") from None
        raise DistillError(f"task_options.{field}: {message[:1].lower() + message[1:]}, got {first.get('input')!r}") from None


class Task:
    """The interface; :class:`distill.tasks.classification.ClassificationTask` is the reference."""

    name = "task"
    #: the metric the verdict, the teacher gate and early stopping compare (higher is better)
    primary_metric = "accuracy"
    #: the ground-truth term the teacher is trained with (a recipe term: a loss reading labels)
    label_term: dict = {"name": "ce", "loss": "ce"}
    #: the teacher cache (``teacher.cache``) that can serve this task's batches: ``None`` (none),
    #: ``"views"`` (one row per sample and replayed view: :mod:`distill.cache`) or ``"tokens"`` (per
    #: example and token position, packed: :mod:`distill.token_cache`, through the three ``cache_*`` methods)
    teacher_cache: str | None = None
    #: whether ``data.labelled`` (labels for only some training samples) is available
    supports_transfer_set = False
    feed: Feed = staticmethod(default_feed)
    #: metrics besides the primary one that the report shows as columns (e.g. ``("perplexity",)``)
    report_metrics: tuple[str, ...] = ()
    #: the data sets this task reads itself (``None``: any of :data:`distill.data.DATASETS`)
    data_names: tuple[str, ...] | None = None

    def training_feed(self, recipe) -> Feed:
        """How a training stage's models are called on a batch (the student, and a live teacher):
        :attr:`feed` unless the recipe asks for another (a causal LM's ``fused_head``)."""
        return self.feed

    @property
    def supports_cache(self) -> bool:
        return self.teacher_cache is not None

    def cache_kind(self, recipe) -> str | None:
        """The cache ``teacher.cache`` builds and reads for ``recipe``: :attr:`teacher_cache`, or
        ``"sequences"`` where the recipe trains on text the teacher writes (:meth:`cache_sequences`)."""
        return self.teacher_cache

    def cache_sequences(self, recipe, prepared, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The text the teacher writes for ``recipe`` (``cache_kind == "sequences"``): token ids
        ``inputs`` and ``targets`` ``[N, T]``, one row per training example."""
        raise NotImplementedError

    # -- token caches (teacher_cache = "tokens") ----------------------------------------------
    def cache_size(self, prepared) -> int:
        """How many examples a token cache of the training set holds: the range of the batches'
        ``"index"`` (one per row of the teacher's per-example outputs)."""
        return len(prepared.train)

    def cache_batches(self, recipe, prepared, batch_size: int):
        """Batches that hold every training example exactly once, each with ``"index"`` (a new
        iterable on each call, the same batches every time)."""
        raise NotImplementedError

    def cache_token_mask(self, teacher: nn.Module):
        """``mask(batch)``: the teacher's real token positions ``[B, T]`` in a batch (``None``: all)."""
        return lambda batch: None

    def cache_fingerprint(self, recipe, prepared, teacher: nn.Module) -> dict:
        """What a token cache of the training set depends on besides the teacher's weights:
        ``{"data": bytes, "tokenizer": JSON-able description, "vocab": int}``."""
        raise NotImplementedError

    #: the task's ``task_options`` (a :class:`TaskOptions` subclass; by default it takes none)
    Options: type[TaskOptions] = TaskOptions

    def options(self, recipe) -> TaskOptions:
        """``recipe.task_options`` checked and typed as :attr:`Options` (defaults filled in)."""
        return parse_options(self.Options, recipe.task_options, self.name)

    def data_options(self, recipe) -> dict:
        """``recipe.data.options`` checked against its data set's typed options
        (:class:`distill.data.DataOptions`, from the builder's signature), converted to their types."""
        from distill.data.registry import data_options_model, parse_data_options

        return parse_data_options(recipe.data.name, data_options_model(recipe.data.name), recipe.data.options)

    def validate(self, recipe) -> None:
        """Raise a :class:`DistillError` for what this task cannot run (models, ``task_options``),
        before any work starts. By default only the ``task_options`` are checked (:attr:`Options`)."""
        self.options(recipe)

    def check_model_name(self, name: str) -> None:
        """Raise a :class:`DistillError` (naming the nearest) when ``name`` is no model of this task;
        by default every name is left to :meth:`build_model`."""

    def prepare(self, recipe, data_dir) -> Any:
        """Load the data once for the whole run; returns an object with ``train`` (the training
        set, whose ``len`` is the number of samples) and ``val_loader`` (or ``None``)."""
        raise NotImplementedError

    def describe(self, prepared) -> str:
        """One line about the data, for the run's log."""
        return f"{len(prepared.train)} training samples"

    def train_loader(self, recipe, prepared, batch_size: int, seed: int, labelled_only: bool = False):
        """Batches of the training set for one stage (with ``set_epoch`` and ``len``).
        ``labelled_only``: only the samples that have labels, for stages that do not read a teacher
        (the teacher itself, the student alone) when the data has an unlabelled transfer set."""
        raise NotImplementedError

    def build_model(self, spec, prepared, seed: int) -> nn.Module:
        """The model of a recipe's model spec (teacher, student, assistant) for this data."""
        raise NotImplementedError

    def check_models(self, teacher: nn.Module, student: nn.Module, prepared) -> None:
        """Raise a :class:`DistillError` when teacher and student cannot be compared (e.g. classes)."""

    def reference(self, teacher: nn.Module, prepared) -> Any:
        """The teacher's outputs on the test split, for agreement metrics (``None``: none)."""
        return None

    def evaluate(self, model: nn.Module, prepared, reference: Any = None, split: str = "test") -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (``test`` or ``val``); includes :attr:`primary_metric`."""
        raise NotImplementedError

    def latency_input(self, prepared) -> Any:
        """One sample (batch 1) to time the models on, or ``None`` to skip latency."""
        return None

    def deploy_metadata(self, prepared) -> dict:
        """What a deployer needs to feed an exported student and read its output, from the data
        (written into the export's metadata): ``num_classes``, ``normalization`` (mean, std and how
        they are applied) and ``class_names``, each where the data has it. By default read from a
        :class:`distill.data.DataSplits` ``prepared.data``; :meth:`raw_training_inputs` tells
        whether its pixels are uint8."""
        data = getattr(prepared, "data", None)
        meta: dict[str, Any] = {}
        if getattr(data, "num_classes", None) is not None:
            meta["num_classes"] = int(data.num_classes)
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        if mean is not None and std is not None:
            raw = self.raw_training_inputs(prepared)
            scaled = raw is not None and raw.dtype == torch.uint8
            meta["normalization"] = {
                "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                "applied": ("x / 255 (uint8 pixels to [0, 1]), then " if scaled else "")
                + "(x - mean) / std per channel (axis 1 of [batch, C, ...])",
            }
        names = getattr(data, "class_names", None)
        if names is not None:
            meta["class_names"] = [str(n) for n in names]
        return meta

    def raw_training_inputs(self, prepared) -> torch.Tensor | None:
        """The training inputs as stored (before normalisation), or ``None``."""
        return getattr(getattr(getattr(prepared, "data", None), "train", None), "inputs", None)

    def profile_input(self, model: nn.Module, prepared) -> Any:
        """One real input (batch 1) for ``model`` as its forward takes it (a tensor, or named tensors
        for a model fed by keyword), for ``distill profile``; by default :meth:`latency_input`."""
        return self.latency_input(prepared)

    def example_inputs(self, prepared, n: int) -> Any:
        """``n`` real model inputs ``[n, ...]`` to check an export on (one tensor, or a dict of named
        tensors such as ``input_ids`` and ``attention_mask`` ``[n, T]`` for a model fed by
        keyword), or ``None`` (random inputs of the :meth:`latency_input` shape are used then)."""
        return None

    def labelled_test_batches(self, prepared) -> Any:
        """Test batches ``{"input", "target"}`` whose top-1 accuracy means something (for int8
        export's accuracy check), or ``None``."""
        return None

    def tokenizer_of(self, model: nn.Module, prepared) -> Any:
        """The ``transformers`` tokenizer that feeds ``model`` (saved next to it by
        :meth:`save_pretrained`), or ``None`` when the task has none (e.g. character ids)."""
        return None

    def save_pretrained(self, model: nn.Module, prepared, stage_dir: Path) -> Path | None:
        """Write a trained student in its own ecosystem's format into a folder of ``stage_dir`` (the
        stage's folder, next to its ``student.safetensors``) and return the folder; ``None`` when
        there is none. By default a Hugging Face model (:class:`distill.nlp.hf.HFModel`) becomes a
        ``save_pretrained`` folder ``hf/`` with its tokenizer (:meth:`tokenizer_of`), which
        ``transformers``' Auto classes load; other models have only their weights file."""
        from distill.nlp.hf import HFModel, save_pretrained

        if not isinstance(model, HFModel):
            return None
        return save_pretrained(model, Path(stage_dir) / "hf", self.tokenizer_of(model, prepared))

    def latency_ms(self, model: nn.Module, prepared, repeats: int) -> float | None:
        """Median ms of one forward pass at batch 1 (``None``: not measured); by default on
        :meth:`latency_input`."""
        example = self.latency_input(prepared)
        if example is None:
            return None
        from distill.measure import cpu_latency_ms

        return cpu_latency_ms(model, example, repeats=repeats)

    def assess_teacher(self, recipe, teacher: nn.Module, prepared, metrics: dict[str, float], reference: Any):
        """The teacher quality gate (``teacher.gate``) from the teacher's test ``metrics``: its
        primary metric against ``min_accuracy`` now, against the student alone after the first
        baseline. Returns a :class:`distill.quality.GateResult`; raises when it already failed."""
        from distill.quality import teacher_gate

        spec = recipe.teacher.gate
        gate = teacher_gate(metrics[self.primary_metric], min_accuracy=spec.min_accuracy, enabled=spec.enabled,
                            require_better_than_baseline=spec.require_better_than_baseline)
        gate.raise_if_failed()
        return gate

    def batch_transform(self, recipe, prepared, student: nn.Module, teacher: Any) -> Any:
        """A per-step transform ``(batch, generator) -> batch`` of a stage's training batches, applied
        after the recipe's own (or ``None``). ``teacher`` is what teaches the stage (a signal such as
        :class:`distill.signals.LiveTeacher`, or a model in ``distill check``); ``None`` when the
        stage trains on labels alone."""
        return None


def first_inputs(loader, n: int):
    """The ``"input"`` of a loader's first ``n`` samples, concatenated (a task's export examples)."""
    import torch

    taken, count = [], 0
    for batch in loader:
        taken.append(batch["input"][: n - count])
        count += len(taken[-1])
        if count >= n:
            break
    return torch.cat(taken)


TASKS: Registry[type[Task]] = Registry("task")

def _task_module(name: str) -> str:
    """The module that defines task ``name``: ``distill/tasks/<name with - as _>.py``."""
    return f"distill.tasks.{name.replace('-', '_')}"


def _discover() -> None:
    """Import every module of :mod:`distill.tasks`; each registers its task as it is imported, so
    a new task is one new file, no list to edit."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name != "base":
            importlib.import_module(f"distill.tasks.{module.name}")


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name``: its module (named after it) is imported on
    first use, and every task module when the name is not found there (tasks of your own register
    by importing the module that defines them)."""
    if name not in TASKS:
        import importlib.util

        module = _task_module(name)
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
        if name not in TASKS:
            _discover()
    return TASKS.get(name)()


def all_tasks() -> dict[str, Task]:
    """Every known task by name (every module of :mod:`distill.tasks` imported)."""
    _discover()
    return {name: TASKS.get(name)() for name in TASKS.names()}
