"""One stage, built in one place: `distill check`, `distill run` and a sweep trial train the same
thing (terms, transforms, teacher signal), and the bugs their copies caused stay fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import distill.stage as stage_module
from distill import DistillError
from distill.check import check_recipe
from distill.cli import main
from distill.pipeline import run_recipe
from distill.recipes import load_recipe

FAST = {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.003}


def classification_recipe(**extra) -> dict:
    recipe = {
        "name": "tiny", "seeds": [0], "threads": 1,
        "data": {"name": "digits", "val_fraction": 0.2},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "train": dict(FAST), "gate": {"enabled": False}},
        "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
        "train": dict(FAST),
        "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                              {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]},
        "evaluate": {"latency": False},
    }
    recipe.update(extra)
    return recipe


SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\nAll:\nWe know't, we know't.\n\n"
)


def lm_recipe(text_file: Path) -> dict:
    return {
        "name": "lm", "task": "causal-lm", "seeds": [0], "threads": 1,
        "data": {"name": "text", "options": {"path": str(text_file), "block_size": 16}, "val_fraction": 0.2},
        "teacher": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                    "train": {**FAST, "batch_size": 4}, "gate": {"enabled": False}},
        "student": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
        "train": {**FAST, "batch_size": 4},
        "distill": {"terms": [{"name": "kd", "loss": "token_gjsd", "params": {"beta": 0.5}}]},
        "task_options": {"on_policy": 0.5, "new_tokens": 4},
        "evaluate": {"latency": False},
    }


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(SHAKESPEARE)
    return path


def text_classification_recipe(tmp_path) -> dict:
    words = (["good", "great", "fun"], ["bad", "dull", "flat"])
    rows = [(f"the {words[i % 2][i % 3]} film {words[i % 2][(i + 1) % 3]}", i % 2) for i in range(24)]
    for name in ("train", "test"):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return {
        "name": "text", "task": "text-classification", "seeds": [0], "threads": 1,
        "data": {"name": "tsv", "options": {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "test.tsv")},
                 "val_fraction": 0.25},
        "teacher": {"model": "bilstm", "kwargs": {"embedding_dim": 8, "hidden_size": 8}, "train": FAST,
                    "gate": {"enabled": False}},
        "student": {"model": "bilstm", "kwargs": {"embedding_dim": 4, "hidden_size": 4}},
        "train": FAST, "distill": {"terms": [{"name": "soft", "loss": "kd", "params": {"temperature": 2.0}}]},
        "evaluate": {"latency": False},
    }


@pytest.mark.parametrize("task", ["classification", "causal-lm", "ranking", "text-classification"])
def test_check_run_and_sweep_trial_build_the_same_distilled_stage(task, tmp_path, recorded_stages, text_file):
    """On 8da6390 a sweep trial of an on-policy causal-LM recipe ran without the task's on-policy
    transform (and `check` dry-ran with the bare teacher model, not the signal a run uses)."""
    from distill.sweep import train_trial

    data = {"classification": classification_recipe, "causal-lm": lambda: lm_recipe(text_file),
            "ranking": lambda: ranking_recipe(tmp_path), "text-classification": lambda: text_classification_recipe(tmp_path),
            }[task]()
    seen = recorded_stages
    run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    from_run = seen["student-seed0"]
    data["teacher"]["weights"] = str(tmp_path / "run" / "teacher.safetensors")
    recipe = load_recipe(data)
    check_recipe(recipe)
    train_trial(recipe)
    assert from_run == seen["distill"] == seen["trial"]
    assert from_run["signal"] == "LiveTeacher"
    if task == "causal-lm":
        assert from_run["transforms"] == ["OnPolicyTransform"]
        on_policy = seen["trial:stage"].transforms[0]
        assert on_policy.batches > 0  # the trial trained through it (8da6390: 0 times)


@pytest.mark.fast
def test_check_refuses_what_run_refuses_cache_without_views():
    """On 8da6390 `distill check demo --set teacher.cache=auto` passed and `distill run` refused it."""
    recipe = load_recipe(classification_recipe(
        data={"name": "digits", "augment": {"crop_padding": 1}}, teacher={
            "model": "mlp", "kwargs": {"hidden": [32]}, "train": dict(FAST), "cache": "auto"}))
    with pytest.raises(DistillError, match="needs data.views"):
        check_recipe(recipe)
    assert main(["check", "demo", "--set", "teacher.cache=auto"]) == 2


@pytest.mark.fast
@pytest.mark.parametrize("weight, message", [(0, "has weight 0"), (-1, "negative weight")])
def test_check_refuses_a_term_that_does_not_train_the_student(weight, message, capsys):
    """On 8da6390 `distill check` approved a term of weight 0 (the run then scored chance) and −1."""
    data = classification_recipe()
    data["distill"]["terms"] = [{"name": "soft", "loss": "kd", "weight": weight}]
    report = check_recipe(load_recipe(data))
    assert any(message in p for p in report.problems), report.problems


def ranking_recipe(tmp_path, **train) -> dict:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for user in range(40):
        group = user % 4
        items = (group * 10 + torch.randperm(10, generator=gen)[:7] + 1).tolist()
        rows += [f"{user + 1}\t{item}\t5\t{t}" for t, item in enumerate(items)]
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    schedule = {"epochs": 2, "batch_size": 64, "lr": 0.01, **train}
    return {
        "name": "rank", "task": "ranking", "seeds": [0], "threads": 1,
        "data": {"name": "ml-100k", "options": {"path": str(folder), "verify": False, "validation": True,
                                                "eval_negatives": 10}},
        "teacher": {"model": "mf", "kwargs": {"dim": 8}, "train": schedule, "gate": {"enabled": False}},
        "student": {"model": "mf", "kwargs": {"dim": 2}},
        "train": schedule,
        "distill": {"terms": [{"name": "hard", "loss": "bce"}, {"name": "soft", "loss": "listnet_kd"}]},
        "evaluate": {"latency": False},
    }


def test_ranking_run_with_validation_and_restore_best_monitors_its_own_metric(tmp_path):
    """On 8da6390 a ranking run with a validation split and restore_best failed at epoch 1: the
    monitor defaulted to val_accuracy, which ranking does not log."""
    data = ranking_recipe(tmp_path, restore_best=True)
    results = run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    assert results["primary_metric"] == "ndcg10"
    history = json.loads((tmp_path / "run" / "stages" / "student-seed0" / "result.json").read_text())["history"]
    assert "val_ndcg10" in history[0]


@pytest.mark.fast
def test_loaded_teacher_is_not_retrained_unless_finetune(tmp_path):
    """On 8da6390 `teacher.weights` with `teacher.train` (every preset) retrained the loaded teacher."""
    from safetensors.torch import load_file

    data = classification_recipe(baseline={"enabled": False}, distill={"enabled": False, "terms": [{"loss": "ce"}]})
    run_recipe(load_recipe(data), tmp_path / "first", progress=False)
    weights = tmp_path / "first" / "teacher.safetensors"
    data["teacher"]["weights"] = str(weights)
    run_recipe(load_recipe(data), tmp_path / "loaded", progress=False)
    assert not (tmp_path / "loaded" / "stages" / "teacher").exists()
    assert not (tmp_path / "loaded" / "teacher.safetensors").exists()
    data["teacher"]["finetune"] = True
    run_recipe(load_recipe(data), tmp_path / "tuned", progress=False)
    tuned = load_file(str(tmp_path / "tuned" / "teacher.safetensors"))
    loaded = load_file(str(weights))
    assert any(not torch.equal(tuned[k], loaded[k]) for k in loaded)
    with pytest.raises(DistillError, match="finetune"):
        load_recipe({**data, "teacher": {**data["teacher"], "weights": None}})


def test_teacher_trains_on_fresh_augmentation_even_when_students_replay_views(tmp_path, monkeypatch):
    """The teacher stage is not limited to the cache's replayed views (issue: teachers worth distilling)."""
    seen = {}
    original = stage_module.assemble_stage

    def spy(name, student, teacher, terms, *, loader, **kwargs):
        seen[name] = getattr(loader, "views", "unknown")
        return original(name, student, teacher, terms, loader=loader, **kwargs)

    monkeypatch.setattr(stage_module, "assemble_stage", spy)
    data = classification_recipe(data={"name": "digits", "views": 2, "augment": {"crop_padding": 1}})
    run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    assert seen["teacher"] is None and seen["student-seed0"] == 2


@pytest.mark.fast
def test_one_train_config_for_recipes_and_the_api():
    from distill import TrainConfig
    from distill.recipes.schema import TrainSpec

    assert issubclass(TrainSpec, TrainConfig)
    api, recipe = TrainConfig(), TrainSpec()
    assert {k: getattr(api, k) for k in TrainSpec.model_fields} == {k: getattr(recipe, k) for k in TrainSpec.model_fields}
    with pytest.raises(DistillError, match="train.seed is set by the run"):
        load_recipe(classification_recipe(train={**FAST, "seed": 3}))
    dumped = yaml.safe_load(yaml.safe_dump(load_recipe(classification_recipe()).model_dump(mode="json")))
    assert "seed" not in dumped["train"] and load_recipe(dumped).train == load_recipe(classification_recipe()).train


def test_export_and_profile_of_a_ranking_run_go_through_its_task(tmp_path, capsys):
    """On 8da6390 `distill export` / `profile` of a ranking run failed: "data set 'ml-100k' has no
    option 'negatives'" (they loaded the data as classification data)."""
    from safetensors.torch import load_file

    data = ranking_recipe(tmp_path)
    data["task_options"] = {"negatives": 3}
    run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    out = tmp_path / "student.safetensors"
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors", "--out", str(out)]) == 0
    exported = load_file(str(out))
    trained = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert main(["profile", str(tmp_path / "run"), "--no-onnx", "--repeats", "2", "--batch", "4"]) == 0
    assert "student (mf)" in capsys.readouterr().out


def test_the_verdict_says_when_the_distilled_stage_has_another_schedule(tmp_path):
    """A stage's own train: may differ from the baseline's only when the recipe says so, and then
    the report says it (issue: --set distill.train.epochs=5 silently changed the whole schedule)."""
    data = classification_recipe(seeds=[0])
    data["distill"]["train"] = {"epochs": 2}
    results = run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    assert results["schedule_difference"] == "epochs 2 vs 1"
    assert "not like for like" in results["verdict"] and "epochs 2 vs 1" in results["verdict"]
    same = run_recipe(load_recipe(classification_recipe()), tmp_path / "same", progress=False)
    assert "schedule_difference" not in same and "not like for like" not in same["verdict"]


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_tap_suggestion_goes_through_the_task(task, tmp_path, text_file, capsys):
    """`distill check --suggest-taps` built classification models and read `batch["input"]` of the
    test split: on a text run it failed with "unknown data set 'tsv'". It now builds the models by
    the task and feeds them one training batch by the task's feed."""
    from distill.tap_suggest import suggest_for_recipe

    data = text_classification_recipe(tmp_path) if task == "text-classification" else lm_recipe(text_file)
    found = suggest_for_recipe(load_recipe(data), samples=8, top=2)
    assert 1 <= len(found.pairs) <= 2 and all(-1.0 <= p.cka <= 1.0 + 1e-6 for p in found.candidates)
    assert any("untrained" in note for note in found.notes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path), "--suggest-taps", "--top", "1"]) == 0
    assert "tap pairs: relative depth and linear CKA" in capsys.readouterr().out


def test_profile_of_a_text_run_goes_through_its_task(tmp_path, capsys):
    """On 8da6390 `distill profile` of a text-classification run failed: "unknown data set 'sst2'"."""
    run_recipe(load_recipe(text_classification_recipe(tmp_path)), tmp_path / "run", progress=False)
    assert main(["profile", str(tmp_path / "run"), "--no-onnx", "--repeats", "2", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "student (bilstm)" in out and "teacher (bilstm)" in out


@pytest.mark.fast
def test_a_recipe_term_and_an_api_term_declare_the_same_fields_and_defaults():
    """`TermSpec` (recipes) builds `Term` (the API) with `Term(**spec.model_dump())`: the two must not
    drift apart (a field added to one only, or another default)."""
    import dataclasses

    from distill.objective import Term
    from distill.recipes.schema import TermSpec

    api = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
           for f in dataclasses.fields(Term)}
    recipe = {name: (f.get_default(call_default_factory=True)) for name, f in TermSpec.model_fields.items()}
    assert list(api) == list(recipe)
    differing = {k for k in api if api[k] != recipe[k]}
    assert differing == {"name", "loss"}  # a recipe's name defaults to its loss's; the loss is required
    assert recipe["name"] is None and api["loss"] is dataclasses.MISSING
