"""distill ladder: students of increasing size, alone and distilled, and what their gains say."""

import copy
import json
import statistics

import pytest
import yaml

import distill
from distill.cli import main
from distill.errors import DistillError
from distill.ladder import capacity_finding, ladder_students, parse_student, run_ladder

BASE = {
    "name": "tiny",
    "seeds": [0, 1],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]},
                "train": {"epochs": 4, "lr": 0.01, "batch_size": 64, "tensorboard": False}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "tensorboard": False},
    "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]},
    "evaluate": {"latency_repeats": 3},
}


def test_ladder_trains_each_size_alone_and_distilled(tmp_path):
    result = run_ladder(distill.load_recipe(BASE), widths=[4, 16], out=tmp_path / "l", workers=1)
    assert [r["label"] for r in result.rungs] == ["hidden 4", "hidden 16"]
    for i, rung in enumerate(result.rungs):
        assert len(rung["alone_per_seed"]) == len(rung["distilled_per_seed"]) == 2
        diffs = [d - a for a, d in zip(rung["alone_per_seed"], rung["distilled_per_seed"])]
        assert rung["gain"] == pytest.approx(statistics.fmean(diffs))
        assert rung["gain_std"] == pytest.approx(statistics.stdev(diffs))
        assert rung["distilled"] - rung["alone"] == pytest.approx(rung["gain"])
        assert rung["params"] > 0 and rung["latency_ms"] > 0
        stages = tmp_path / "l" / "sizes" / f"{i:02d}-{rung['label'].replace(' ', '_')}" / "stages"
        assert {p.name for p in stages.iterdir()} >= {"baseline-seed0", "student-seed0", "baseline-seed1", "student-seed1"}
        assert not (stages / "teacher").exists()  # the teacher was trained once, not per size
    assert result.rungs[0]["params"] < result.rungs[1]["params"]
    assert (tmp_path / "l" / "teacher" / "teacher.safetensors").exists()
    assert (tmp_path / "l" / "teacher-cache").is_dir()
    assert (tmp_path / "l" / "ladder.png").stat().st_size > 0
    saved = json.loads((tmp_path / "l" / "ladder.json").read_text())
    assert saved["finding"]["text"] == result.finding.text and len(saved["rungs"]) == 2


def rungs(gains, stds=None, params=(100, 400, 1600, 6400, 25600), model="cnn", widths=(2, 4, 8, 16, 32)):
    stds = stds or [0.003] * len(gains)
    return [{"label": f"width {w}", "params": p, "gain": g / 100, "gain_std": s / 100, "model": model,
             "kwargs": {"width": w, "depth": 2}} for g, s, p, w in zip(gains, stds, params, widths)]


TEACHER = {"model": "cnn", "kwargs": {"width": 64, "depth": 3}, "params": 100000}


def test_finding_peak_then_fall_and_teacher_assistant_advice():
    finding = capacity_finding(rungs([-0.5, 1.0, 2.5, 1.0, 0.2]), TEACHER)
    assert finding.peak == 2 and finding.falls
    assert "peaks at width 8" in finding.text and "falls again" in finding.text
    assert finding.advice and "width 2" in finding.advice and "teacher assistant" in finding.advice
    assert finding.assistant == {"model": "cnn", "kwargs": {"width": 11, "depth": 2}}  # sqrt(64 * 2) = 11.3
    pasted = yaml.safe_load(finding.assistant_yaml)
    assert pasted == {"assistants": [finding.assistant]}
    recipe = copy.deepcopy(BASE)
    recipe["assistants"] = [{"model": "mlp", "kwargs": {"hidden": [16]}}]  # the chain section loads
    assert distill.load_recipe(recipe).assistants[0].model == "mlp"


def test_finding_rising_gain_has_no_gap_and_no_advice():
    finding = capacity_finding(rungs([1.0, 1.5, 2.0], params=(10, 20, 40)), TEACHER)
    assert finding.peak == 2 and not finding.falls
    assert "no sign of a capacity gap" in finding.text and finding.advice is None


def test_finding_drop_within_spread_is_not_a_fall():
    finding = capacity_finding(rungs([0.5, 2.0, 1.8], stds=[0.5, 0.5, 0.5], params=(10, 20, 40)), TEACHER)
    assert finding.peak == 1 and not finding.falls and "no clear fall" in finding.text


def test_finding_when_the_teacher_helps_no_one():
    finding = capacity_finding(rungs([-1.0, -0.4, -2.0], params=(10, 20, 40)), TEACHER)
    assert "helps none" in finding.text and finding.advice is None


def test_finding_small_gain_for_the_smallest_proposes_a_size_between_when_models_differ():
    ladder = [{"label": f"hidden {h}", "params": p, "gain": g, "gain_std": 0.0, "model": "mlp", "kwargs": {"hidden": [h]}}
              for h, p, g in ((8, 610, 0.002), (32, 2410, 0.03), (128, 9610, 0.02), (512, 38410, 0.01))]
    teacher = {"model": "cnn", "kwargs": {"width": 64}, "params": 40000}
    finding = capacity_finding(list(reversed(ladder)), teacher)  # order does not matter
    assert finding.peak == 1 and finding.falls
    # sqrt(40000 * 610) = 4940: the nearest size in log scale is hidden 128 (9,610) over hidden 32 (2,410)
    assert finding.assistant == {"model": "mlp", "kwargs": {"hidden": [128]}}
    assert "+0.20 points" in finding.advice


def test_ladder_sizes():
    assert [s["kwargs"]["width"] for s in ladder_students({"model": "cnn", "kwargs": {"depth": 2}})] == [8, 16, 32, 64, 128]
    mlp = ladder_students({"model": "mlp", "kwargs": {"hidden": [64, 32]}}, scales=[0.5, 2])
    assert [s["kwargs"]["hidden"] for s in mlp] == [[32, 16], [128, 64]]
    assert [s["kwargs"]["hidden"] for s in ladder_students({"model": "mlp", "kwargs": {"hidden": [8, 8]}},
                                                            widths=[4, [16, 8]])] == [[4, 4], [16, 8]]
    assert parse_student("cnn,width=4,depth=2") == {"model": "cnn", "kwargs": {"width": 4, "depth": 2}}
    assert ladder_students({"model": "mlp", "kwargs": {}}, students=[parse_student("mlp,hidden=[16]")])[0]["label"] == "mlp hidden=16"
    with pytest.raises(DistillError, match="has no width option"):
        ladder_students({"model": "shufflenetv2", "kwargs": {}})
    with pytest.raises(DistillError, match="positive"):
        ladder_students({"model": "cnn", "kwargs": {}}, scales=[1, -2])


def test_cli_ladder_errors_are_one_line(tmp_path, capsys):
    source = tmp_path / "tiny.yaml"
    source.write_text(yaml.safe_dump(BASE))
    assert main(["ladder", str(source), "--scales", "0", "--out", str(tmp_path / "a")]) == 2
    assert main(["ladder", str(source), "--students", "cnn,width", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
