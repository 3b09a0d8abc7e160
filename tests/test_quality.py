"""The teacher quality gate: temperature scaling recovers a known temperature, the gate refuses a
teacher no better than the student alone or below the threshold, and a run stops with the override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main
from distill.errors import DistillError
from distill.quality import OVERRIDE, calibrate, fit_temperature, nll, teacher_gate

pytestmark = pytest.mark.fast


def synthetic(temperature: float, n: int = 20000, classes: int = 10, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports z * temperature, so dividing its logits by
    ``temperature`` gives back the true probabilities."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z * temperature, targets


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5, 6.0])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    logits, targets = synthetic(true_t)
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_t, rel=0.05)
    best = nll(logits, targets, fitted)
    assert best <= nll(logits, targets, fitted * 1.1) and best <= nll(logits, targets, fitted / 1.1)


def test_calibration_lowers_nll_and_ece_of_an_overconfident_model():
    logits, targets = synthetic(3.0, n=5000)
    fit = calibrate(logits.float(), targets, "validation")
    assert fit.temperature > 2.5 and fit.split == "validation" and fit.samples == 5000
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before


def test_gate_refuses_a_teacher_worse_than_the_student_alone():
    result = teacher_gate(0.80, baseline_accuracy=0.85)
    assert not result.passed
    assert "not better than the student trained alone (85.00%)" in result.failures[0]
    with pytest.raises(DistillError, match="--set teacher.gate.enabled=false"):
        result.raise_if_failed()
    assert not teacher_gate(0.85, baseline_accuracy=0.85).passed  # equal is not better


def test_gate_passes_a_good_teacher_and_explains_nothing_failed():
    result = teacher_gate(0.95, min_accuracy=0.9, baseline_accuracy=0.85)
    assert result.passed and result.failures == []
    result.raise_if_failed()
    assert "passed" in result.summary() and "95.00% > student alone 85.00%" in result.summary()


def test_gate_threshold_and_switches():
    low = teacher_gate(0.70, min_accuracy=0.9)
    assert not low.passed and "below teacher.gate.min_accuracy 90.00%" in low.failures[0]
    assert teacher_gate(0.80, baseline_accuracy=0.85, require_better_than_baseline=False).passed
    assert teacher_gate(0.10, min_accuracy=0.9, baseline_accuracy=0.85, enabled=False).passed
    both = teacher_gate(0.70, min_accuracy=0.9, baseline_accuracy=0.85)
    assert len(both.failures) == 2


def test_gate_notes_weak_classes_and_the_temperature():
    logits, targets = synthetic(2.0, n=2000)
    fit = calibrate(logits, targets)
    result = teacher_gate(0.9, per_class_accuracy=[0.95] * 9 + [0.5], temperature=fit)
    assert any("class 9 50.0%" in note for note in result.notes)
    assert any(note.startswith(f"suggested temperature {fit.temperature:.2f}") and "over-confident" in note
               for note in result.notes)
    assert result.to_dict()["suggested_temperature"] == fit.temperature


# ------------------------------------------------------------------------------ in a run
RECIPE = {
    "name": "gate",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits", "val_fraction": 0.1},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}, "train": {"epochs": 3, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64},
    "distill": {"terms": [{"loss": "kd", "params": {"temperature": 2.0}}]},
    "evaluate": {"latency": False},
}
# a teacher barely trained (tiny step size): near chance, far below the student trained alone
WEAK = {**RECIPE["teacher"], "train": {"epochs": 1, "lr": 1e-6, "batch_size": 64}}


def write(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_run_records_the_gate_and_suggested_temperature(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", write(tmp_path, RECIPE), "--out", str(out), "--quiet"]) == 0
    gate = json.loads((out / "results.json").read_text())["teacher_gate"]
    assert gate["passed"] and gate["enabled"] and gate["baseline_accuracy"] is not None
    assert gate["accuracy"] > gate["baseline_accuracy"]
    assert gate["temperature"]["split"] == "validation" and gate["suggested_temperature"] > 0
    report = (out / "report.md").read_text()
    assert "teacher gate: passed" in report and "suggested temperature" in report
    assert "teacher gate: passed" in capsys.readouterr().out


def test_run_stops_before_distilling_from_a_teacher_worse_than_the_baseline(tmp_path, capsys):
    recipe = {**RECIPE, "teacher": WEAK}
    out = tmp_path / "run"
    code = main(["run", write(tmp_path, recipe), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "teacher quality gate failed" in err and "not better than the student trained alone" in err
    assert OVERRIDE in err
    assert (out / "stages" / "baseline-seed0" / "result.json").exists()  # the baseline was needed
    assert not (out / "stages" / "student-seed0").exists()  # distillation never started
    # the override from the message lets the run finish
    code = main(["run", write(tmp_path, recipe), "--out", str(out), "--resume", "--quiet", "--set",
                 "teacher.gate.enabled=false"])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["teacher_gate"]["enabled"] is False


def test_run_stops_right_after_the_teacher_below_min_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", write(tmp_path, RECIPE), "--out", str(out), "--quiet",
                 "--set", "teacher.gate.min_accuracy=0.999"])
    err = capsys.readouterr().err
    assert code == 2 and "below teacher.gate.min_accuracy 99.90%" in err
    assert not (out / "stages" / "baseline-seed0").exists()


@pytest.mark.parametrize("override,message", [
    ("teacher.gate.min_acc=0.5", "unknown field"),
    ("teacher.gate.min_accuracy=80", "teacher.gate.min_accuracy"),
])
def test_gate_recipe_fields_are_checked(tmp_path, capsys, override, message):
    code = main(["check", write(tmp_path, RECIPE), "--set", override])
    assert code == 2 and message in capsys.readouterr().err
