"""Classification: images, 1-D signals or vectors with one label each.

The task loads the data set (with its training subset, validation split and augmentation), builds
zoo or user models for it, and measures accuracy, agreement with the teacher, KL and ECE (the
metric functions live in :mod:`distill.metrics`). Its teacher gate fits the suggested temperature
on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data import BatchLoader, DataSplits, load_dataset, split_validation
from distill.data.types import UNLABELLED, ArrayDataset
from distill.data.splits import training_subset
from distill.errors import DistillError
from distill.metrics import (  # noqa: F401  (re-exported: the metrics' earlier home)
    accuracy, agreement, classification_metrics, expected_calibration_error, kl_teacher_student,
    per_class_accuracy, predict, topk_accuracy,
)
from distill.models import create_model
from distill.signals import default_feed
from distill.tasks.base import TASKS, Task

feed = default_feed


@dataclass
class Prepared:
    """Data and loaders of a run, built once and shared by every stage."""

    data: DataSplits
    train: Any  # every training sample; those without a label (the transfer set) have target UNLABELLED
    val: Any | None
    test_loader: BatchLoader
    val_loader: BatchLoader | None
    labelled: Any | None = None  # the labelled training samples, when data.labelled keeps only some


def prepare_data(recipe, data_dir: str | Path | None) -> Prepared:
    """The recipe's data set, training subset and validation split, with test/validation loaders."""
    spec = recipe.data
    data = load_dataset(spec.name, data_dir, **spec.options)
    if spec.augment.shift and data.is_image:
        raise DistillError("data.augment.shift is for 1-D signals; use crop_padding and flip for images")
    train = training_subset(data.train, spec.train_subset, spec.seed)
    val, labelled, unlabelled = None, None, None
    if spec.labelled is not None and spec.labelled < len(train):
        # the labels a user has: drawn first, so the validation split comes from them too
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed + 104729))
        unlabelled = train.subset(order[spec.labelled:].sort().values)
        train = train.subset(order[: spec.labelled].sort().values)
    if spec.val_fraction > 0:
        train, val = split_validation(train, spec.val_fraction, seed=spec.seed)
    if unlabelled is not None:
        labelled = train
        hidden = torch.full_like(unlabelled.targets, UNLABELLED)
        train = ArrayDataset(torch.cat([labelled.inputs, unlabelled.inputs]), torch.cat([labelled.targets, hidden]))
    kwargs = dict(mean=data.mean, std=data.std)
    test_loader = BatchLoader(data.test, spec.eval_batch_size, shuffle=False, **kwargs)
    val_loader = BatchLoader(val, spec.eval_batch_size, shuffle=False, **kwargs) if val is not None else None
    return Prepared(data, train, val, test_loader, val_loader, labelled)


def train_loader(recipe, prepared: Prepared, batch_size: int, seed: int, labelled_only: bool = False) -> BatchLoader:
    """Shuffled training batches with the recipe's augmentation (replayed views when ``data.views``):
    every training sample, or with ``labelled_only`` those with a label (``data.labelled``)."""
    augment = recipe.data.augment.model_dump(include={"crop_padding", "flip"}) if prepared.data.is_image else None
    samples = prepared.labelled if labelled_only and prepared.labelled is not None else prepared.train
    return BatchLoader(
        samples, batch_size, shuffle=True, seed=seed, drop_last=len(samples) > batch_size,
        mean=prepared.data.mean, std=prepared.data.std, augment=augment,
        views=recipe.data.views, view_seed=recipe.data.seed,
    )


def build_model(spec, data: DataSplits, seed: int) -> nn.Module:
    """The zoo (or ``module:callable``) model of ``spec`` for ``data``, seeded, with its weights."""
    torch.manual_seed(seed)
    return create_model(spec.model, data.num_classes, data.input_shape, weights=spec.weights, **spec.kwargs)


def check_label_space(teacher: nn.Module, student: nn.Module, batch: dict, feed, data) -> None:
    """Raise a :class:`DistillError` unless teacher and student, fed ``batch`` by ``feed``, predict
    ``data.num_classes`` classes (``data`` names the data set); both models keep their mode."""
    from distill.taps import output_tensor

    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    with torch.no_grad():
        t, s = output_tensor(feed(teacher, batch)).shape[-1], output_tensor(feed(student, batch)).shape[-1]
    teacher.train(modes[0]), student.train(modes[1])
    if t != s:
        raise DistillError(f"teacher predicts {t} classes but the student {s}; they must share the label space")
    if t != data.num_classes:
        raise DistillError(f"teacher predicts {t} classes, but data set '{data.name}' has {data.num_classes}")


def check_classes(teacher: nn.Module, student: nn.Module, prepared: Prepared) -> None:
    """Teacher, student and data must share one label space."""
    batch = {"input": next(iter(prepared.test_loader))["input"][:2]}
    check_label_space(teacher, student, batch, default_feed, prepared.data)


@TASKS.register("classification")
class ClassificationTask(Task):
    """Images, 1-D signals or vectors with one label each: accuracy, agreement, KL, ECE."""

    name = "classification"
    primary_metric = "accuracy"
    teacher_cache = "views"
    supports_transfer_set = True

    def check_model_name(self, name: str) -> None:
        if ":" not in name:  # module:callable user models are checked when built
            from distill.models import MODELS

            MODELS.get(name)

    def prepare(self, recipe, data_dir):
        return prepare_data(recipe, data_dir)

    def describe(self, prepared) -> str:
        transfer = len(prepared.train) - len(prepared.labelled) if prepared.labelled is not None else 0
        return (
            f"{prepared.data.name}: {len(prepared.train) - transfer} train"
            + (f" + {transfer} unlabelled (transfer set)" if transfer else "")
            + (f", {len(prepared.val)} validation" if prepared.val is not None else "")
            + f", {len(prepared.data.test)} test, {prepared.data.num_classes} classes"
        )

    def train_loader(self, recipe, prepared, batch_size: int, seed: int, labelled_only: bool = False):
        return train_loader(recipe, prepared, batch_size, seed, labelled_only)

    def build_model(self, spec, prepared, seed: int):
        return build_model(spec, prepared.data, seed)

    def check_models(self, teacher, student, prepared) -> None:
        check_classes(teacher, student, prepared)

    def reference(self, teacher, prepared):
        return predict(teacher, prepared.test_loader)[0]

    def evaluate(self, model, prepared, reference=None, split: str = "test") -> dict[str, float]:
        loader = prepared.test_loader if split == "test" else prepared.val_loader
        logits, targets = predict(model, loader)
        return classification_metrics(logits, targets, reference if split == "test" else None)

    def latency_input(self, prepared):
        return next(iter(prepared.test_loader))["input"][:1]

    def example_inputs(self, prepared, n: int):
        from distill.tasks.base import first_inputs

        return first_inputs(prepared.test_loader, n)

    def labelled_test_batches(self, prepared):
        return prepared.test_loader

    def assess_teacher(self, recipe, teacher, prepared, metrics, reference):
        """The gate with calibration: the suggested temperature is fitted on the validation split."""
        from distill.quality import assess_teacher

        targets = torch.cat([b["target"] for b in prepared.test_loader])
        calibration = None
        if prepared.val_loader is None:  # never the test split: training samples, and the report says so
            known = prepared.labelled if prepared.labelled is not None else prepared.train
            n = min(len(known), 5000)
            subset = training_subset(known, n, recipe.data.seed) if n < len(known) else known
            loader = BatchLoader(subset, recipe.data.eval_batch_size, shuffle=False,
                                 mean=prepared.data.mean, std=prepared.data.std)
            calibration = (loader, "training (no validation split, so optimistic: set data.val_fraction)")
        return assess_teacher(recipe.teacher.gate, teacher, prepared, reference, targets, recipe.baseline.enabled,
                              calibration)
