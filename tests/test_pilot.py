"""The pilot chooses temperature and term weights on a validation split carved from the training
data, within its budget, before anything reads the test split."""

from __future__ import annotations

import json

import pytest
import torch

import distill.stage as stage_module
from distill import DistillError
from distill.models import create_model, save_weights
from distill.pilot import candidate_settings, pilot_epochs
from distill.pipeline import run_recipe
from distill.recipes import load_recipe
from distill.tasks.classification import ClassificationTask

FAST = {"epochs": 6, "batch_size": 32, "optimizer": "adam", "lr": 0.01}


def recipe(teacher_file: str, **pilot) -> dict:
    return {
        "name": "pilot", "seeds": [0], "threads": 1,
        "data": {"name": "digits"},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "weights": teacher_file, "gate": {"enabled": False}},
        "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
        "train": dict(FAST),
        "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.1},
                              {"name": "soft", "loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]},
        "evaluate": {"latency": False},
        "pilot": {"budget": 1.0, "temperatures": [1.0], "teacher_weights": [0.1, 0.9], "min_val_samples": 100,
                  **pilot},
    }


@pytest.fixture
def random_teacher(tmp_path):
    """An untrained teacher: it knows nothing, so the less weight it gets the better."""
    path = tmp_path / "random-teacher.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("mlp", 10, (64,), hidden=[32]), path)
    return str(path)


def test_candidates_cover_temperatures_and_teacher_shares(random_teacher):
    r = load_recipe(recipe(random_teacher, temperatures=[1.0, 4.0], teacher_weights=[0.5, 0.9]))
    found = dict(candidate_settings(r, r.pilot))
    assert list(found) == ["T 1, teacher weight 0.5", "T 1, teacher weight 0.9", "T 4, teacher weight 0.5",
                           "T 4, teacher weight 0.9"]
    assert found["T 4, teacher weight 0.9"] == {"distill.terms.1.params.temperature": 4.0,
                                               "distill.terms.1.weight": 0.9, "distill.terms.0.weight": 0.1}
    epochs, budget, run_epochs = pilot_epochs(r, r.pilot, trials=5)
    assert run_epochs == 12 and budget == 12 and epochs == 2  # baseline + distilled, one seed; 12 // 5


def test_pilot_picks_the_known_best_setting_and_writes_it_into_the_run(random_teacher, tmp_path):
    results = run_recipe(load_recipe(recipe(random_teacher)), tmp_path / "run", progress=False)
    pilot = results["pilot"]
    assert pilot["chosen"]["label"] == "T 1, teacher weight 0.1"
    scores = {t["label"]: t["score"] for t in pilot["trials"]}
    assert scores["T 1, teacher weight 0.1"] > scores["T 1, teacher weight 0.9"]
    written = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert [t.weight for t in written.distill.terms] == [0.9, 0.1]
    assert json.loads((tmp_path / "run" / "pilot.json").read_text())["chosen"] == pilot["chosen"]
    assert "pilot" in pilot["summary"] and str(pilot["val_samples"]) in pilot["summary"]
    assert "baseline" in results and "student" in results  # the full comparison is still reported


def test_the_test_split_is_not_read_before_the_pilot_is_done(random_teacher, tmp_path, monkeypatch):
    events = []
    original_assemble = stage_module.assemble_stage
    monkeypatch.setattr(stage_module, "assemble_stage",
                        lambda name, *a, **k: events.append(("stage", name)) or original_assemble(name, *a, **k))
    for method in ("evaluate", "reference"):
        original = getattr(ClassificationTask, method)

        def spy(self, model, prepared, *args, _original=original, _method=method, **kwargs):
            split = kwargs.get("split", args[1] if len(args) > 1 else "test") if _method == "evaluate" else "test"
            events.append(("read", split))
            return _original(self, model, prepared, *args, **kwargs)

        monkeypatch.setattr(ClassificationTask, method, spy)
    run_recipe(load_recipe(recipe(random_teacher)), tmp_path / "run", progress=False)
    last_pilot = max(i for i, e in enumerate(events) if e[0] == "stage" and e[1].startswith("pilot"))
    first_test = min(i for i, e in enumerate(events) if e == ("read", "test"))
    assert last_pilot < first_test
    assert all(e != ("read", "test") for e in events[:last_pilot])


def test_pilot_refuses_a_validation_split_too_small_to_decide(random_teacher, tmp_path):
    with pytest.raises(DistillError, match=r"holds \d+ samples, too few .* at least 100"):
        run_recipe(load_recipe(recipe(random_teacher, val_fraction=0.02)), tmp_path / "run", progress=False)


def test_cli_pilot_flag_adds_the_pilot_section(random_teacher, tmp_path):
    import yaml

    from distill.cli import main

    data = recipe(random_teacher)
    del data["pilot"]
    data["train"]["epochs"] = 14  # 28 epochs of the run, a quarter is 7: one each for alone + 6 settings
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--pilot", "--quiet", "--out", str(tmp_path / "run"),
                 "--set", "pilot.min_val_samples=100"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["pilot"]["epochs"] == 1 and len(results["pilot"]["trials"]) == 6


def test_a_pilot_that_found_nothing_says_when_its_trials_were_shorter_than_the_run():
    from distill.pilot import PilotResult, PilotTrial

    result = PilotResult(metric="accuracy", epochs=3, budget_epochs=21, run_epochs=90, train_samples=100,
                         val_samples=200, alone=0.9, trials=[PilotTrial("T 1", {}, 0.85)], stage_epochs=15)
    text = result.summary()
    assert "no setting beat the student alone" in text and "ran 3 of the run's 15 epochs" in text
    result.stage_epochs = 3
    assert "ran 3 of" not in result.summary()
