"""An unlabelled transfer set (``data.labelled``): a user with a pre-trained teacher and few labels.
The student alone (and a trained teacher) see the labelled samples only; the distilled student's
teacher terms read every sample, its label terms only the labelled ones."""

from __future__ import annotations

import pytest
import torch

import distill.stage as stage_module
from distill import DistillError
from distill.data.types import UNLABELLED
from distill.losses import ce_loss
from distill.pipeline import run_recipe
from distill.recipes import load_recipe
from distill.tasks.classification import prepare_data, train_loader

FAST = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01}


def recipe(**data) -> dict:
    return {
        "name": "transfer", "seeds": [0], "threads": 1,
        "data": {"name": "digits", "labelled": 150, **data},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "train": dict(FAST), "gate": {"enabled": False}},
        "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
        "train": dict(FAST),
        "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.1}, {"name": "soft", "loss": "kd", "weight": 0.9}]},
        "evaluate": {"latency": False},
    }


def test_labels_are_kept_for_the_chosen_samples_and_validation_comes_from_them():
    r = load_recipe(recipe(val_fraction=0.2))
    prepared = prepare_data(r, None)
    n_val = len(prepared.val)
    assert 25 <= n_val <= 35 and len(prepared.labelled) + n_val == 150  # validation is carved from the 150 labels
    assert len(prepared.train) == 1437 - n_val
    kept = 150 - n_val
    assert int((prepared.train.targets != UNLABELLED).sum()) == kept
    assert torch.equal(prepared.train.targets[:kept], prepared.labelled.targets)
    assert train_loader(r, prepared, 32, 0, labelled_only=True).num_samples == kept
    every = train_loader(r, prepared, 32, 0)
    assert every.num_samples == 1437 - n_val and any((b["target"] == UNLABELLED).any() for b in every)
    assert load_recipe(recipe()).data.labelled == 150 and prepare_data(load_recipe(recipe(labelled=None)), None).labelled is None


def test_ce_skips_unlabelled_samples_and_is_zero_on_a_batch_without_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    assert torch.isclose(ce_loss(logits, labels), ce_loss(logits[[0, 2]], labels[[0, 2]]))
    none = ce_loss(logits, torch.full((4,), UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_a_run_trains_alone_on_the_labels_and_distils_on_every_sample(tmp_path, monkeypatch):
    seen = {}
    original = stage_module.assemble_stage

    def spy(name, student, teacher, terms, *, loader, **kwargs):
        seen[name] = loader.num_samples
        return original(name, student, teacher, terms, loader=loader, **kwargs)

    monkeypatch.setattr(stage_module, "assemble_stage", spy)
    results = run_recipe(load_recipe(recipe()), tmp_path / "run", progress=False)
    assert seen == {"teacher": 150, "baseline-seed0": 150, "student-seed0": 1437}
    assert "baseline" in results and "student" in results


def test_terms_that_read_a_label_for_every_sample_are_refused():
    data = recipe()
    data["distill"]["terms"] = [{"loss": "dkd"}]
    with pytest.raises(DistillError, match="data.labelled leaves most samples without a label"):
        stage_module.check_runnable(load_recipe(data), __import__("distill.tasks.base", fromlist=["get_task"]).get_task("classification"))
