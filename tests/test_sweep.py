"""distill sweep: the search space, pruning, selection on the validation split, and what it writes."""

import copy
import csv

import pytest
import yaml

import distill
from distill.cli import main
from distill.errors import DistillError
from distill.sweep import (
    EpochReporter, current_value, default_space, parse_space, pareto_front, read_space, run_sweep,
)

BASE = {
    "name": "tiny",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [32]},
                "train": {"epochs": 3, "lr": 0.01, "batch_size": 64, "tensorboard": False}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "tensorboard": False},
    "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]},
    "evaluate": {"latency_repeats": 3},
}


def data_of(**changes):
    """The recipe as the sweep sees it: validated, dumped to a mapping."""
    data = copy.deepcopy(BASE)
    data.update(changes)
    return distill.load_recipe(data).model_dump(mode="json")


# ------------------------------------------------------------------------------ the space
def test_default_space_searches_temperature_teacher_weights_lr_and_student_size():
    space = default_space(data_of())
    assert space["distill.terms.1.params.temperature"] == {"low": 1.0, "high": 8.0, "log": True}
    assert space["distill.terms.1.weight"] == {"low": 0.05, "high": 5.0, "log": True}
    assert "distill.terms.0.weight" not in space  # the label term is the fixed reference
    assert space["train.lr"]["low"] == pytest.approx(0.002) and space["train.lr"]["high"] == pytest.approx(0.05)
    assert not any(p.startswith("student") for p in space)  # an mlp has no width/depth option
    cnn = default_space(data_of(student={"model": "cnn", "kwargs": {"width": 8, "depth": 2}}))
    assert cnn["student.kwargs.width"] == {"low": 4, "high": 16, "log": True}
    assert cnn["student.kwargs.depth"] == {"low": 1, "high": 3}
    dims = {d.path: d for d in parse_space(cnn, data_of(student={"model": "cnn", "kwargs": {"width": 8, "depth": 2}}))}
    assert dims["student.kwargs.width"].kind == "int" and dims["distill.terms.1.params.temperature"].kind == "float"


def test_space_types_come_from_the_recipe_and_defaults():
    data = data_of(student={"model": "cnn", "kwargs": {"depth": 2}})
    assert current_value(data, "student.kwargs.width") == 32  # the model's default
    dims = parse_space({"train.epochs": {"low": 1, "high": 3}, "student.kwargs.width": {"low": 4, "high": 16, "step": 4},
                        "distill.terms.1.loss": ["kd", "dkd"], "train.optimizer": {"choices": ["adam", "sgd"]}}, data)
    kinds = {d.path: d.kind for d in dims}
    assert kinds == {"train.epochs": "int", "student.kwargs.width": "int", "distill.terms.1.loss": "categorical",
                     "train.optimizer": "categorical"}
    assert read_space(None, ["train.lr={low: 0.001, high: 0.1, log: true}"]) == {
        "train.lr": {"low": 0.001, "high": 0.1, "log": True}}


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"low": 0.001, "high": 0.01}}, "unknown field"),
    ({"distill.terms.5.weight": {"low": 0.1, "high": 1}}, "not an index of a list of 2"),
    ({"train.lr": {"low": 0.01, "high": 0.001}}, "must be below high"),
    ({"train.lr": {"low": 0, "high": 0.1, "log": True}}, "log: true needs low > 0"),
    ({"train.lr": {"lo": 0.001, "high": 0.1}}, "unknown key 'lo'"),
    ({"train.lr": {"low": 0.001}}, "high missing"),
    ({"train.lr": 0.1}, "expected {low"),
    ({"train.lr": {"low": "a", "high": 1}}, "low must be a number"),
    ({"train.lr": {"low": 0.001, "high": 0.1, "log": True, "step": 0.01}}, "log and step cannot be combined"),
    ({"train.epochs": {"low": 1.5, "high": 3}}, "must be an integer"),
    ({"teacher.train.lr": {"low": 0.001, "high": 0.1}}, "only student.*, train.*, distill.* fields"),
    ({"student.kwargs.widht": {"low": 4, "high": 8}}, "model 'mlp' has no option 'widht'"),
    ({"distill.terms.1.params.temprature": {"low": 1, "high": 4}}, "loss 'kd' has no parameter 'temprature'"),
    ({"distill.terms.1.loss": {"choices": []}}, "non-empty list"),
    ({"distill.terms.1.loss": ["kd", "nope"]}, "unknown loss 'nope'"),
    ({"train.lr": {"low": -1.0, "high": 0.1}}, "train.lr"),
    ({}, "expected a mapping"),
])
def test_bad_spaces_are_one_line_errors(space, message):
    with pytest.raises(DistillError) as info:
        parse_space(space, data_of())
    text = str(info.value)
    assert message in text and "\n" not in text


def test_space_file_errors(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        read_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(DistillError, match="must map field paths"):
        read_space(bad)
    with pytest.raises(DistillError, match="--param expects PATH=SPEC"):
        read_space(None, ["train.lr"])


def test_pareto_front():
    points = [(1.0, 80.0), (2.0, 85.0), (1.5, 79.0), (3.0, 84.0), (0.5, 70.0)]
    assert [points[i] for i in pareto_front(points)] == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0)]


# ------------------------------------------------------------------------------ pruning
def test_epoch_reporter_stops_a_trial_the_pruner_prunes():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    reporter = EpochReporter(good)
    assert [reporter({"epoch": e, "val_accuracy": v}) for e, v in ((1, 0.8), (2, 0.9))] == [False, False]
    study.tell(good, 0.9)
    bad = study.ask()
    reporter = EpochReporter(bad)
    assert reporter({"epoch": 1, "val_accuracy": 0.05}) is True  # terrible: below the median at epoch 1
    assert reporter.pruned_at == 1
    with pytest.raises(DistillError, match="not among the metrics"):
        EpochReporter(bad)({"epoch": 1, "train_loss": 1.0})


def test_pruned_trials_stop_training_early(tmp_path):
    optuna = pytest.importorskip("optuna")

    class PruneAfterFirst(optuna.pruners.BasePruner):
        """Prunes every trial but the first, at its first report."""

        def prune(self, study, trial):
            return trial.number >= 1

    pruner = PruneAfterFirst()
    recipe = distill.load_recipe({**BASE, "train": {**BASE["train"], "epochs": 3}})
    result = run_sweep(recipe, 3, out=tmp_path / "s", workers=1, pruner=pruner, compare=False)
    rows = {r["number"]: r for r in result.trials}
    assert rows[0]["state"] == "COMPLETE" and rows[0]["epochs"] == 3
    assert [rows[n]["state"] for n in (1, 2)] == ["PRUNED", "PRUNED"]
    assert [rows[n]["epochs"] for n in (1, 2)] == [1, 1]  # stopped after the first epoch, not trained on
    assert result.best["number"] == 0
    with open(tmp_path / "s" / "trials.csv") as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["COMPLETE", "PRUNED", "PRUNED"]


# ------------------------------------------------------------------------------ selection
def test_trials_never_evaluate_on_the_test_split(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from distill.tasks.classification import ClassificationTask

    teacher = copy.deepcopy(BASE)
    teacher["distill"]["enabled"], teacher["baseline"] = False, {"enabled": False}
    distill.run_recipe(distill.load_recipe(teacher), tmp_path / "teacher", progress=False)
    splits = []
    evaluate = ClassificationTask.evaluate

    def recording(self, model, prepared, reference=None, split="test"):
        splits.append(split)
        return evaluate(self, model, prepared, reference, split)

    monkeypatch.setattr(ClassificationTask, "evaluate", recording)
    recipe = copy.deepcopy(BASE)
    recipe["teacher"] = {**recipe["teacher"], "train": None, "weights": str(tmp_path / "teacher" / "teacher.safetensors")}
    result = run_sweep(distill.load_recipe(recipe), 2, out=tmp_path / "s", workers=1, compare=False,
                       space={"train.lr": {"low": 0.003, "high": 0.03, "log": True}})
    assert splits and set(splits) == {"val"}  # every epoch and every final score: validation only
    done = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert done and all(0 <= r["val_score"] <= 1 for r in done)
    assert result.best["val_score"] == max(r["val_score"] for r in done)
    assert result.settings["val_fraction"] == 0.1  # the recipe had no validation split
    assert any("val_fraction=0.1" in note for note in result.notes)
    assert result.comparison is None and not result.teacher["trained"]


def test_cli_sweep_writes_best_recipe_table_and_plots(tmp_path, capsys):
    pytest.importorskip("optuna")
    source = tmp_path / "tiny.yaml"
    source.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "sweep"
    code = main(["sweep", str(source), "--trials", "3", "--workers", "1", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    best = distill.load_recipe(out / "best.yaml")  # a valid recipe
    assert best.data.val_fraction == 0.1 and best.teacher.train is not None and best.teacher.cache is None
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[0]["default"] == "True"
    assert {"distill.terms.1.params.temperature", "distill.terms.1.weight", "train.lr"} <= set(rows[0])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "sweep.json").exists()
    summary = yaml.safe_load((out / "sweep.json").read_text())
    assert set(summary["comparison"]) >= {"default", "best", "gain_points"}
    assert "test accuracy over seeds [0]: best trial" in printed and "default recipe" in printed


def test_cli_sweep_errors_are_one_line(tmp_path, capsys):
    source = tmp_path / "tiny.yaml"
    source.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", str(source), "--trials", "0", "--out", str(tmp_path / "a")]) == 2
    assert main(["sweep", str(source), "--trials", "2", "--param", "train.lr=[1, 2",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_comparison_separates_the_student_found_from_the_settings_found():
    from distill.sweep import Dimension, comparison_params

    dims = [Dimension("train.lr", "float", 1e-4, 1e-1, log=True), Dimension("student.kwargs.width", "int", 2, 32)]
    defaults = {"train.lr": 0.002, "student.kwargs.width": 8}
    both = {"train.lr": 0.01, "student.kwargs.width": 16}
    runs = comparison_params(both, defaults, dims)
    assert runs == {"default": {}, "best": both, "best_settings": {"train.lr": 0.01}}
    only_lr = {"train.lr": 0.01, "student.kwargs.width": 8}  # same student: best is like for like already
    assert comparison_params(only_lr, defaults, dims) == {"default": {}, "best": only_lr}
    only_student = {"train.lr": 0.002, "student.kwargs.width": 16}  # best settings = default settings
    assert comparison_params(only_student, defaults, dims) == {"default": {}, "best": only_student}
    assert comparison_params(dict(defaults), defaults, dims) == {"default": {}}
    # the recipe's student is outside the space: there is no default student to put the settings on
    assert "best_settings" not in comparison_params(both, {"train.lr": 0.002}, dims)
