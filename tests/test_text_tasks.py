"""`distill run` / `distill check` for text classification and causal language modelling from
recipes: tiny random Hugging Face models saved to folders, tiny tokenizers, generated TSVs and a
few hundred characters of text; nothing is downloaded."""

from __future__ import annotations

import json
import random

import pytest
import torch
from text_helpers import wordpiece_tokenizer
import yaml

from distill import DistillError
from distill.cli import main
from distill.recipes import load_recipe

WORDS_GOOD = ["good", "great", "fun", "charming", "warm", "delight", "lovely", "superb"]
WORDS_BAD = ["bad", "dull", "boring", "mess", "awful", "tedious", "flat", "weak"]
FILLER = ["the", "movie", "plot", "film", "is", "a", "and", "really", "quite", "story"]
TINY_BERT = dict(
    model_type="bert", hidden_size=24, num_attention_heads=12, intermediate_size=32, max_position_embeddings=64,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 3) + rng.sample(WORDS_GOOD if label else WORDS_BAD, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path, rows) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


def wordpiece(texts):
    return wordpiece_tokenizer(texts, vocab_size=60)


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    """A folder in SST-2's layout (train.tsv, dev.tsv) with 64 + 16 generated sentences."""
    folder = tmp_path_factory.mktemp("sst2")
    write_tsv(folder / "train.tsv", sentences(64, 0))
    write_tsv(folder / "dev.tsv", sentences(16, 1))
    return folder


def save_bert(folder, tok, layers: int, labels: int):
    from distill.nlp import from_config

    model = from_config({**TINY_BERT, "num_hidden_layers": layers, "vocab_size": len(tok)}, num_labels=labels, seed=0)
    model.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny 6-layer, 12-head BERT folders (model and tokenizer): a 2-label and a 3-label head."""
    tok = wordpiece([s for s, _ in sentences(64, 0)])
    return {labels: save_bert(tmp_path_factory.mktemp(f"bert{labels}"), tok, 6, labels) for labels in (2, 3)}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


FAST = {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.001}


def text_recipe(sst, teacher_dir, student: dict, terms: list, **extra) -> dict:
    return {
        "name": "text", "task": "text-classification", "seeds": [0], "threads": 1,
        "data": {"name": "sst2", "options": {"path": str(sst), "verify": False}, "eval_batch_size": 8},
        "task_options": {"max_length": 16},
        "teacher": {"model": "hf", "kwargs": {"name_or_path": str(teacher_dir)}, "train": FAST,
                    "gate": {"enabled": False}},
        "student": student, "train": FAST, "distill": {"terms": terms},
        "evaluate": {"latency_repeats": 2}, **extra,
    }


def run(tmp_path, recipe: dict, *extra: str) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet", *extra]) == 0
    assert (out / "report.md").is_file() and (out / "student.safetensors").is_file()
    return json.loads((out / "results.json").read_text())


def check(tmp_path, recipe: str | dict, *overrides: str) -> int:
    if isinstance(recipe, dict):
        path = tmp_path / "check.yaml"
        path.write_text(yaml.safe_dump(recipe))
        recipe = str(path)
    return main(["check", recipe, *[a for o in overrides for a in ("--set", o)]])


# --- text classification -------------------------------------------------------------------------

def test_hf_student_distilled_tinybert_style_end_to_end(sst, teachers, tmp_path):
    student = {"model": "hf", "kwargs": {"config": {**TINY_BERT, "num_hidden_layers": 2}}}  # the teacher's tokenizer
    terms = [{"name": "soft", "loss": "kd", "params": {"temperature": 1.0}},
             {"name": "hidden1", "loss": "hint", "student": "hidden_states.1", "teacher": "hidden_states.3"},
             {"name": "attention1", "loss": "hint", "weight": 100.0, "adapter": "identity",
              "student": "attentions.0", "teacher": "attentions.2"}]
    results = run(tmp_path, text_recipe(sst, teachers[2], student, terms))
    assert results["task"] == "text-classification" and results["primary_metric"] == "accuracy"
    for role in ("teacher", "baseline", "student"):
        assert 0.0 <= results[role]["accuracy"] <= 1.0 and results[role]["latency_ms"] > 0
    assert 0.0 <= results["student"]["agreement"] <= 1.0 and "kl_to_teacher" in results["student"]
    assert results["teacher"]["params"] > results["student"]["params"]
    history = json.loads((tmp_path / "run/stages/student-seed0/result.json").read_text())["history"]
    assert {"train_soft", "train_hidden1", "train_attention1"} <= set(history[0])


def test_bilstm_student_on_its_own_vocabulary_with_a_pretrained_teacher_as_is(sst, teachers, tmp_path):
    from distill.tasks.base import get_task

    recipe = text_recipe(sst, teachers[2], {"model": "bilstm", "kwargs": {"embedding_dim": 16, "hidden_size": 8,
                                                                           "fc_size": 8}},
                         [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "mse", "loss": "hint", "weight": 0.5, "student": "logits", "teacher": "logits",
                           "adapter": "identity"}])
    recipe["teacher"] = {"model": "hf", "kwargs": {"name_or_path": str(teachers[2])}, "pretrained": True,
                         "gate": {"enabled": False}}
    recipe["data"]["val_fraction"] = 0.25
    # each side reads its own tokenisation from one batch
    task = get_task("text-classification")
    prepared = task.prepare(load_recipe(recipe), None)
    batch = next(iter(task.train_loader(load_recipe(recipe), prepared, 4, 0)))
    assert {"teacher.input_ids", "student.input_ids", "target", "index"} <= set(batch)
    assert len(prepared.train) == 48 and len(prepared.val) == 16
    results = run(tmp_path, recipe)
    assert not (tmp_path / "run/stages/teacher").exists()  # used as-is: no teacher stage
    assert results["student"]["model"] == "bilstm" and 0.0 <= results["student"]["agreement"] <= 1.0
    history = json.loads((tmp_path / "run/stages/baseline-seed0/result.json").read_text())["history"]
    assert "val_accuracy" in history[0]


def test_text_recipes_refuse_what_they_cannot_run(sst, teachers, tmp_path, capsys):
    ce = [{"name": "hard", "loss": "ce"}]
    base = text_recipe(sst, teachers[2], {"model": "bilstm"}, ce)
    with pytest.raises(DistillError, match="unknown model 'lstm' for task text-classification; choose hf or bilstm"):
        load_recipe({**base, "student": {"model": "lstm"}})
    teacher = {"model": "hf", "kwargs": {"config": {**TINY_BERT, "num_hidden_layers": 2}}, "train": FAST}
    with pytest.raises(DistillError, match="teacher .* has no tokenizer: set teacher.kwargs.tokenizer"):
        load_recipe({**base, "teacher": teacher})
    with pytest.raises(DistillError, match="exactly one of kwargs.name_or_path"):
        load_recipe({**base, "student": {"model": "hf", "kwargs": {}}})
    with pytest.raises(DistillError, match="unknown data set 'mnist' for task text-classification"):
        load_recipe({**base, "data": {"name": "mnist"}})
    with pytest.raises(DistillError, match="no option max_len"):
        load_recipe({**base, "task_options": {"max_len": 3}})
    # label spaces: a checkpoint with a 3-label head, and a teacher asked for 3 outputs
    assert check(tmp_path, {**base, "teacher": {**base["teacher"], "kwargs": {"name_or_path": str(teachers[3])}}}) == 2
    assert "has a classification head of 3 labels but the data has 2 classes" in capsys.readouterr().err
    assert check(tmp_path, {**base, "teacher": {**base["teacher"], "kwargs": {
        "name_or_path": str(teachers[2]), "num_labels": 3}}}) == 2
    assert "head of 2 labels but kwargs.num_labels asks for 3" in capsys.readouterr().err
    three = {**base["teacher"], "kwargs": {"config": {**TINY_BERT, "num_hidden_layers": 2}, "num_labels": 3,
                                           "tokenizer": str(teachers[2])}}
    assert check(tmp_path, {**base, "teacher": three}) == 2
    assert "teacher predicts 3 classes but the student 2; they must share the label space" in capsys.readouterr().err
    # a tokenizer folder that does not exist
    missing = {**base, "student": {"model": "bilstm", "kwargs": {"tokenizer": str(tmp_path / "nowhere")}}}
    assert check(tmp_path, missing) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["sst2-bilstm", "sst2-tinybert"])
def test_sst2_presets_pass_check(preset, sst, teachers, capsys):
    code = check(None, preset, f"teacher.kwargs.name_or_path={teachers[2]}", f"data.options.path={sst}",
                 "data.options.verify=false")
    assert code == 0, capsys.readouterr().err
    assert "check passed" in capsys.readouterr().out


def test_sst2_preset_check_on_the_real_files(shared, teachers, capsys):
    code = check(None, "sst2-bilstm", f"teacher.kwargs.name_or_path={teachers[2]}",
                 f"data.options.path={shared / 'sst2'}", "data.train_subset=200")
    assert code == 0, capsys.readouterr().err


# --- causal language modelling -------------------------------------------------------------------

SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\nAll:\nWe know't, we know't.\n\n"
    "First Citizen:\nLet us kill him, and we'll have corn at our own price.\nIs't a verdict?\n\n"
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(SHAKESPEARE)
    return path


def lm_recipe(text_file, student: dict, terms: list, options: dict) -> dict:
    return {
        "name": "lm", "task": "causal-lm", "seeds": [0], "threads": 1,
        "data": {"name": "text", "options": {"path": str(text_file), "block_size": 16, "val_fraction": 0.2}},
        "teacher": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                    "train": {**FAST, "epochs": 2, "batch_size": 4}, "gate": {"enabled": False}},
        "student": student, "train": {**FAST, "batch_size": 4}, "distill": {"terms": terms},
        "task_options": options, "evaluate": {"latency_repeats": 2},
    }


def test_causal_lm_on_policy_with_an_hf_student_end_to_end(text_file, tmp_path, monkeypatch):
    from distill.tasks import causal_lm

    calls = []
    original = causal_lm.OnPolicyTransform.__call__

    def spy(self, batch, generator):
        out = original(self, batch, generator)
        calls.append(self.last_on_policy)
        if self.last_on_policy:
            assert "target" not in out and out["mask"].any()
        return out

    monkeypatch.setattr(causal_lm.OnPolicyTransform, "__call__", spy)
    student = {"model": "hf", "kwargs": {"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                    "n_positions": 16}}}
    recipe = lm_recipe(text_file, student, [{"name": "kd", "loss": "token_gjsd", "params": {"beta": 0.5}}],
                       {"on_policy": 0.5, "new_tokens": 4})
    results = run(tmp_path, recipe)
    assert results["task"] == "causal-lm" and results["report_metrics"] == ["perplexity"]
    for role in ("teacher", "baseline", "student"):
        metrics = results[role]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["perplexity"] > 1.0 and metrics["latency_ms"] > 0
    assert 0.0 <= results["student"]["agreement"] <= 1.0 and results["student"]["kl_to_teacher"] >= 0.0
    assert any(calls) and not all(calls)  # λ = 0.5: some batches on-policy, some not
    assert "perplexity" in (tmp_path / "run/report.md").read_text()


def test_causal_lm_sequence_kd_trains_on_the_teachers_text(text_file, tmp_path):
    from distill.data import load_dataset
    from distill.models import create_model
    from distill.tasks.causal_lm import TeacherSequences

    data = load_dataset("text", None, path=str(text_file), block_size=16)
    teacher = create_model("gpt", data.num_classes, (16,), n_layer=1, n_head=2, n_embd=16)
    written = TeacherSequences(teacher, data.train, prompt_tokens=4, seed=0)
    batch = {"input": data.train.inputs[[2, 0]].float(), "target": data.train.targets[[2, 0]],
             "index": torch.tensor([2, 0])}
    out = written(batch, torch.Generator())
    assert out["input"].shape == batch["input"].shape and out["input"].dtype == torch.float32
    assert torch.equal(out["input"][:, :4], batch["input"][:, :4])  # the prompt is the block's own start
    assert torch.equal(out["input"][:, 1:], out["target"][:, :-1])  # next-token targets of the teacher's text
    again = written({**batch, "index": torch.tensor([0])}, torch.Generator())
    assert torch.equal(again["input"][0], out["input"][1])  # written once, replayed by index
    fresh = TeacherSequences(teacher, data.train, prompt_tokens=4, seed=0)({**batch, "index": torch.tensor([0])},
                                                                            torch.Generator())
    assert torch.equal(fresh["input"][0], out["input"][1])  # the same text whatever order blocks come in

    recipe = lm_recipe(text_file, {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
                       [{"name": "ce", "loss": "token_ce"}], {"sequence_kd": True, "sequence_kd_prompt_tokens": 4})
    results = run(tmp_path, recipe)
    assert results["student"]["perplexity"] > 1.0


def test_causal_lm_recipes_refuse_what_they_cannot_run(text_file):
    base = lm_recipe(text_file, {"model": "gpt"}, [{"name": "kd", "loss": "token_fkl"}], {})
    with pytest.raises(DistillError, match="read labels, which on-policy batches"):
        load_recipe({**base, "task_options": {"on_policy": 0.5},
                     "distill": {"terms": [{"name": "ce", "loss": "token_ce"}, {"name": "kd", "loss": "token_fkl"}]}})
    with pytest.raises(DistillError, match=r"on_policy \(GKD's λ\) must be in \[0, 1\]"):
        load_recipe({**base, "task_options": {"on_policy": 1.5}})
    with pytest.raises(DistillError, match="causal-lm has no option lambda"):
        load_recipe({**base, "task_options": {"lambda": 0.5}})
    with pytest.raises(DistillError, match="unknown model 'bilstm' for task causal-lm"):
        load_recipe({**base, "student": {"model": "bilstm"}})
    with pytest.raises(DistillError, match="not both"):
        load_recipe({**base, "task_options": {"on_policy": 0.5, "sequence_kd": True}})
    # a baseline without terms trains on the task's own labels (next-token cross-entropy)
    assert [t.loss for t in load_recipe(base).baseline.terms] == ["token_ce"]


@pytest.mark.parametrize("preset", ["tinyshakespeare-gpt", "tinyshakespeare-gkd"])
def test_tinyshakespeare_presets_pass_check(preset, shared, capsys):
    code = check(None, preset, f"data.options.path={shared / 'tinyshakespeare'}")
    assert code == 0, capsys.readouterr().err
    assert "check passed" in capsys.readouterr().out


def test_tsv_files_of_your_own(sst, tmp_path):
    from distill.tasks.base import get_task

    write_tsv(tmp_path / "test.tsv", [("fine", 2), ("bad", 0)])
    recipe = load_recipe({
        "task": "text-classification",
        "data": {"name": "tsv", "options": {"train": str(sst / "train.tsv"), "test": str(tmp_path / "test.tsv")}},
        "teacher": {"model": "bilstm", "train": FAST}, "student": {"model": "bilstm"},
        "distill": {"terms": [{"loss": "kd"}]},
    })
    task = get_task("text-classification")
    prepared = task.prepare(recipe, None)
    assert (len(prepared.train), len(prepared.data.test), prepared.data.num_classes) == (64, 2, 3)
    assert "tsv: 64 train, 2 test sentences, 3 classes" in task.describe(prepared)
    with pytest.raises(DistillError, match="needs|takes the options train and test"):
        task.prepare(recipe.model_copy(update={"data": recipe.data.model_copy(update={"options": {}})}), None)
