"""The command line end to end, on small offline data (scikit-learn digits)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill.cli import main

RECIPE = {
    "name": "tiny",
    "seeds": [0, 1],
    "threads": 1,
    "data": {"name": "digits", "val_fraction": 0.1},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]},
                "train": {"epochs": 4, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 3, "lr": 0.01, "batch_size": 64},
    "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
                          {"name": "hint", "loss": "hint", "student": "act1", "teacher": "act1"}]},
    "evaluate": {"latency_repeats": 3},
}


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    assert main(["run", write(tmp, RECIPE), "--out", str(out), "--quiet"]) == 0
    return tmp, out


def test_run_writes_results_report_and_weights(finished_run):
    _, out = finished_run
    results = json.loads((out / "results.json").read_text())
    for role in ("teacher", "baseline", "student"):
        assert 0.0 <= results[role]["accuracy"] <= 1.0
        assert results[role]["params"] > 0
    assert results["teacher"]["params"] > results["student"]["params"]
    assert len(results["student"]["per_seed"]["accuracy"]) == 2
    assert {"agreement", "kl_to_teacher", "ece", "top5", "accuracy_std"} <= set(results["student"])
    assert results["teacher"]["accuracy"] > 0.8  # digits is easy: a trained teacher, not chance
    report = (out / "report.md").read_text()
    assert "| distilled |" in report and "baseline (no teacher)" in report and "Verdict" in report
    assert (out / "losses.png").stat().st_size > 0 and (out / "accuracy_vs_params.png").stat().st_size > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "tiny"
    from safetensors.torch import load_file

    weights = load_file(out / "student.safetensors")
    assert not any(k.startswith("adapters") for k in weights)  # the bare student
    from distill.models import create_model

    student = create_model("mlp", 10, (1, 8, 8), hidden=[8])
    student.load_state_dict(weights)
    header = (out / "stages" / "student-seed0" / "metrics.csv").read_text().splitlines()[0]
    assert "train_soft" in header and "train_hint" in header and "val_accuracy" in header


def test_existing_run_dir_is_not_overwritten(finished_run, capsys):
    tmp, out = finished_run
    code, _, err = run_cli(["run", write(tmp, RECIPE), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "results.json").exists()


def test_resume_of_a_finished_stage_reproduces_its_result(finished_run, tmp_path, capsys):
    tmp, out = finished_run
    before = json.loads((out / "results.json").read_text())
    # lose the distilled stage's result: resume must rebuild it from its last checkpoint
    (out / "stages" / "student-seed1" / "result.json").unlink()
    code, _, _ = run_cli(["run", write(tmp, RECIPE), "--out", str(out), "--resume", "--quiet"], capsys)
    assert code == 0
    after = json.loads((out / "results.json").read_text())
    assert after["student"]["per_seed"] == before["student"]["per_seed"]


def test_report_command(finished_run, capsys):
    _, out = finished_run
    code, stdout, _ = run_cli(["report", str(out)], capsys)
    assert code == 0 and "distilled" in stdout and "baseline (no teacher)" in stdout


@pytest.mark.fast
def test_check_with_misspelled_tap_names_nearest(tmp_path, capsys):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["distill"]["terms"][2]["student"] = "act_1"
    code, _, err = run_cli(["check", write(tmp_path, recipe)], capsys)
    assert code == 2
    assert "unknown tap 'act_1' on student; nearest:" in err and "act1" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.fast
def test_check_prints_taps_adapters_and_terms(tmp_path, capsys):
    code, out, _ = run_cli(["check", write(tmp_path, RECIPE)], capsys)
    assert code == 0
    assert "act1" in out and "adapter for 'hint'" in out and "term 'soft'" in out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"student": {"model": "mlpp"}}, "unknown model 'mlpp'; nearest: mlp"),
        ({"data": {"name": "digitz"}}, "unknown data set 'digitz'"),
        ({"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
        ({"distill": {"terms": [{"loss": "kl"}]}}, "unknown loss 'kl'"),
    ],
)
@pytest.mark.fast
def test_bad_recipes_exit_2_with_one_line(tmp_path, capsys, change, message):
    recipe = {**RECIPE, **change}
    code, _, err = run_cli(["run", write(tmp_path, recipe), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.fast
def test_malformed_yaml_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2 and "not valid YAML" in err


def five_class_model(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))


@pytest.mark.fast
def test_teacher_and_student_with_different_class_counts(tmp_path, capsys):
    recipe = {**RECIPE, "teacher": {**RECIPE["teacher"], "model": "tests.test_cli:five_class_model", "kwargs": {}},
              "distill": {"terms": [{"loss": "kd"}]}}
    code, _, err = run_cli(["check", write(tmp_path, recipe)], capsys)
    assert code == 2 and "teacher predicts 5 classes but the student 10" in err


@pytest.mark.fast
def test_nan_loss_exits_2_naming_the_step(tmp_path, capsys):
    recipe = {**RECIPE, "teacher": {**RECIPE["teacher"],
              "train": {"epochs": 1, "lr": 1e30, "optimizer": "sgd", "batch_size": 64}}}
    code, _, err = run_cli(["run", write(tmp_path, recipe), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "teacher: loss is" in err and "step" in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: recipe") and "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "distill", "--debug", "run", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cached_teacher_trains_the_same_student_as_the_live_one(finished_run, tmp_path, capsys):
    tmp, live = finished_run
    recipe = {**RECIPE, "seeds": [0], "teacher": {**RECIPE["teacher"], "cache": "auto", "cache_dtype": "fp32"}}
    out = tmp_path / "cached"
    code, stdout, _ = run_cli(["run", write(tmp_path, recipe), "--out", str(out), "--quiet"], capsys)
    assert code == 0 and "teacher cache: building" in stdout
    assert (out / "teacher-cache" / "header.json").exists()
    from safetensors.torch import load_file

    a = load_file(live / "stages" / "student-seed0" / "student.safetensors")
    b = load_file(out / "stages" / "student-seed0" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_command_and_fingerprint_refusal(finished_run, tmp_path, capsys):
    tmp, live = finished_run
    recipe_path = write(tmp_path, {**RECIPE, "seeds": [0]})
    cache = tmp_path / "cache"
    teacher = f"teacher.weights={live / 'teacher.safetensors'}"
    code, stdout, _ = run_cli(["cache", recipe_path, "--set", teacher, "--out", str(cache)], capsys)
    assert code == 0 and "teacher cache:" in stdout
    code, _, err = run_cli(["check", recipe_path, "--set", teacher, "--set", f"teacher.cache={cache}"], capsys)
    assert code == 0, err
    # a cache made by another teacher is refused
    torch.manual_seed(5)
    from distill.models import create_model, save_weights

    other = tmp_path / "other.safetensors"
    save_weights(create_model("mlp", 10, (1, 8, 8), hidden=[64]), other)
    code, _, err = run_cli(["run", recipe_path, "--set", f"teacher.weights={other}", "--set",
                            f"teacher.cache={cache}", "--set", "teacher.train=null",
                            "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "teacher weights" in err
    code, _, err = run_cli(["cache", recipe_path, "--out", str(tmp_path / "c2")], capsys)
    assert code == 2 and "needs a trained teacher" in err


@pytest.mark.fast
def test_list_names_every_task_and_the_data_sets_tasks_register(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the console wraps long lines
    tasks = flat[flat.index("tasks:"):flat.index("models:")]
    for name in ("classification", "ranking", "detection", "text-classification", "sentence-embedding", "causal-lm"):
        assert name in tasks
    data = flat[flat.index("data sets:"):flat.index("presets:")].replace(",", " ").split()
    assert {"mnist", "ml-100k", "stsb", "text", "tinyshakespeare"} <= set(data)
