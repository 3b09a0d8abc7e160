"""What a task plugs into a run: its data, how models are built and fed, how they are evaluated.

The pipeline (teacher → baseline → distilled → report) is the same for every field; a task says
what differs. A recipe picks one with ``task: NAME`` (default ``classification``):

    @TASKS.register("ranking")
    class RankingTask(Task): ...

A task's methods get the recipe and the object its :meth:`Task.prepare` returned, and nothing in
the pipeline looks inside that object except through the task.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from distill.errors import DistillError
from distill.registry import Registry
from distill.signals import Feed, default_feed


class Task:
    """The interface; :class:`distill.tasks.classification.ClassificationTask` is the reference."""

    name = "task"
    #: the metric the verdict, the teacher gate and early stopping compare (higher is better)
    primary_metric = "accuracy"
    #: the ground-truth term the teacher is trained with (a recipe term: a loss reading labels)
    label_term: dict = {"name": "ce", "loss": "ce"}
    #: whether a teacher cache (``teacher.cache``) can serve this task's batches
    supports_cache = False
    #: whether ``data.labelled`` (labels for only some training samples) is available
    supports_transfer_set = False
    feed: Feed = staticmethod(default_feed)
    #: metrics besides the primary one that the report shows as columns (e.g. ``("perplexity",)``)
    report_metrics: tuple[str, ...] = ()
    #: the data sets this task reads itself (``None``: any of :data:`distill.data.DATASETS`)
    data_names: tuple[str, ...] | None = None

    def validate(self, recipe) -> None:
        """Raise a :class:`DistillError` for what this task cannot run (models, ``task_options``),
        before any work starts. By default the task takes no ``task_options``."""
        if recipe.task_options:
            raise DistillError(f"task '{self.name}' takes no task_options (got {', '.join(recipe.task_options)})")

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

    def example_inputs(self, prepared, n: int) -> Any:
        """``n`` real model inputs ``[n, ...]`` to check an export on, or ``None`` (random inputs of
        the :meth:`latency_input` shape are used then)."""
        return None

    def labelled_test_batches(self, prepared) -> Any:
        """Test batches ``{"input", "target"}`` whose top-1 accuracy means something (for int8
        export's accuracy check), or ``None``."""
        return None

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


TASKS: Registry[type[Task]] = Registry("task")

#: where each task outside the registry's import is defined (imported on first use)
TASK_MODULES = {
    "classification": "distill.tasks.classification",
    "ranking": "distill.tasks.ranking",
    "detection": "distill.tasks.detection",
    "text-classification": "distill.tasks.text_classification",
    "sentence-embedding": "distill.tasks.sentence_embedding",
    "causal-lm": "distill.tasks.causal_lm",
}


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name`` (tasks outside the core register on import)."""
    if name not in TASKS and name in TASK_MODULES:
        import importlib

        importlib.import_module(TASK_MODULES[name])
    return TASKS.get(name)()


def all_tasks() -> dict[str, Task]:
    """Every known task by name, each module imported (which also registers its data sets)."""
    return {name: get_task(name) for name in TASK_MODULES}
