"""The token-level teacher cache (distill.token_cache): causal LMs and text classifiers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml

from distill import DistillError
from distill.cli import main
from distill.recipes import load_recipe

SHAKESPEARE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
               "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n") * 6
FAST = {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.003}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(SHAKESPEARE)
    return path


def lm_recipe(text_file, **teacher) -> dict:
    return {
        "name": "lm", "task": "causal-lm", "seeds": [0], "threads": 1,
        "data": {"name": "text", "options": {"path": str(text_file), "block_size": 16, "val_fraction": 0.2}},
        "teacher": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                    "train": {**FAST, "epochs": 2}, "gate": {"enabled": False}, **teacher},
        "student": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 1, "n_embd": 8}},
        "train": FAST, "distill": {"terms": [{"name": "kd", "loss": "token_fkl"}]},
        "evaluate": {"latency_repeats": 2},
    }


def lm_parts(text_file, **teacher):
    from distill.stage import make_cache  # noqa: F401  (the module under test is reached through the stage)
    from distill.tasks.base import get_task

    recipe = load_recipe(lm_recipe(text_file, **teacher))
    task = get_task("causal-lm")
    prepared = task.prepare(recipe, None)
    model = task.build_model(recipe.teacher, prepared, 0)
    return recipe, task, prepared, model


# ------------------------------------------------------------------------------ causal LM
def test_causal_lm_run_with_teacher_cache_auto_replays_the_top_k_and_never_runs_the_teacher(text_file, tmp_path,
                                                                                              monkeypatch):
    from distill.signals import LiveTeacher
    from distill.token_cache import TokenCache

    calls = {"live": 0, "cache": 0}
    live_outputs, cache_outputs = LiveTeacher.outputs, TokenCache.outputs

    def live(self, batch, taps=()):
        calls["live"] += 1
        return live_outputs(self, batch, taps)

    def cached(self, batch, taps=()):
        calls["cache"] += 1
        return cache_outputs(self, batch, taps)

    monkeypatch.setattr(LiveTeacher, "outputs", live)
    monkeypatch.setattr(TokenCache, "outputs", cached)
    recipe = lm_recipe(text_file, cache="auto", cache_topk=8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["student"]["perplexity"] > 1.0 and 0.0 <= results["student"]["agreement"] <= 1.0
    header = json.loads((tmp_path / "run/teacher-cache/header.json").read_text())
    blocks = header["num_samples"]
    assert header["format"] == "distill-token-cache" and header["tokens"] == blocks * 16 and header["topk"] == 8
    assert header["outputs"]["logits"]["per"] == "token"
    # the teacher ran once per cache batch (8 blocks each), the student's steps read the cache
    assert calls["live"] == -(-blocks // FAST["batch_size"]) and calls["cache"] >= blocks // FAST["batch_size"]


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-6), ("fp16", 2e-3)])
def test_cached_top_k_is_the_live_teachers_and_gives_the_same_loss(text_file, tmp_path, dtype, tolerance):
    from distill.data import BatchLoader
    from distill.losses import get_loss
    from distill.stage import make_cache, open_cache

    recipe, task, prepared, teacher = lm_parts(text_file, cache_topk=8, cache_dtype=dtype)
    make_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    cache = open_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    batch = next(iter(BatchLoader(prepared.train, 4, shuffle=True, seed=3)))
    top = cache.outputs(batch)["logits"]
    teacher.eval()
    with torch.no_grad():
        logits = teacher(batch["input"].long())
    values, indices = torch.log_softmax(logits, -1).topk(8, -1)
    assert top.log_probs.shape == (4, 16, 8) and torch.equal(top.indices, indices)
    assert (top.log_probs - values).abs().max() <= tolerance * max(1.0, float(values.abs().max()))
    assert torch.allclose(top.tail, 1 - values.exp().sum(-1), atol=1e-5)
    student = torch.randn_like(logits, requires_grad=True)
    fkl = get_loss("token_fkl").fn
    cached, live = fkl(student, top), fkl(student, logits, topk=8)
    assert abs(float(cached.detach()) - float(live.detach())) <= 10 * tolerance * abs(float(live.detach()))
    g_cached, = torch.autograd.grad(cached, student)
    g_live, = torch.autograd.grad(live, student)
    assert torch.allclose(g_cached, g_live, atol=10 * tolerance)


def test_distill_cache_command_for_a_causal_lm(text_file, tmp_path, capsys):
    from distill.models import save_weights
    from distill.token_cache import TokenCache

    recipe, task, prepared, teacher = lm_parts(text_file)
    save_weights(teacher, tmp_path / "teacher.safetensors")
    data = lm_recipe(text_file, weights=str(tmp_path / "teacher.safetensors"), cache_topk=4)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["cache", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "c")]) == 0
    assert "teacher cache:" in capsys.readouterr().out
    cache = TokenCache(tmp_path / "c", token_mask=lambda batch: None)
    assert cache.topk == 4 and cache.header["tokens"] == len(prepared.train) * 16


def test_a_cache_of_another_tokenizer_vocabulary_or_teacher_is_refused_with_the_difference_named(text_file,
                                                                                                tmp_path):
    from distill.stage import make_cache, open_cache

    recipe, task, prepared, teacher = lm_parts(text_file, cache_topk=4)
    make_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    other = tmp_path / "other.txt"
    other.write_text(SHAKESPEARE.replace("F", "Q"))  # another character vocabulary (Q for F), same length
    recipe2, task2, prepared2, _ = lm_parts(other, cache_topk=4)
    with pytest.raises(DistillError, match="its data and tokenizer differ"):
        open_cache(recipe2, task2, teacher, prepared2, tmp_path / "cache")
    bigger = tmp_path / "bigger.txt"
    bigger.write_text(SHAKESPEARE + "Zz")  # one more character in the vocabulary: the size differs too
    recipe3, task3, prepared3, _ = lm_parts(bigger, cache_topk=4)
    with pytest.raises(DistillError, match=r"tokenizer and vocabulary differ .*vocab: \d+ -> \d+"):
        open_cache(recipe3, task3, teacher, prepared3, tmp_path / "cache")
    retrained = task.build_model(recipe.teacher, prepared, 1)
    with pytest.raises(DistillError, match="its teacher weights differ"):
        open_cache(recipe, task, retrained, prepared, tmp_path / "cache")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_tampered_or_truncated_cache_file_is_refused_before_training(text_file, tmp_path, damage):
    from distill.stage import make_cache, open_cache

    recipe, task, prepared, teacher = lm_parts(text_file, cache_topk=4)
    make_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    file = tmp_path / "cache" / "0.topk_values.npy"
    raw = bytearray(file.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0xFF
    else:
        raw = raw[: len(raw) - 64]
    file.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="0.topk_values.npy is corrupt or truncated"):
        open_cache(recipe, task, teacher, prepared, tmp_path / "cache")


def test_on_policy_with_a_cache_is_refused_in_one_line(text_file):
    base = lm_recipe(text_file, cache="auto")
    with pytest.raises(DistillError, match="teacher.cache replays .* task_options.on_policy"):
        load_recipe({**base, "task_options": {"on_policy": 0.5}})


def test_sequence_kd_caches_the_teachers_text_and_trains_as_the_live_run(text_file, tmp_path, monkeypatch):
    """Sequence-level KD with `teacher.cache` (issue 16): the teacher writes every block's continuation
    once into the cache (checksummed, fingerprinted with the sampling settings); a run reading it
    never has the teacher write again and trains exactly the student the live run trains."""
    from distill.pipeline import run_recipe
    from distill.stage import make_cache, open_cache
    from distill.tasks import causal_lm

    sequence_kd = {"sequence_kd": True, "sequence_kd_prompt_tokens": 4}
    recipe, task, prepared, model = lm_parts(text_file)
    recipe = load_recipe({**recipe.model_dump(mode="json"), "task_options": sequence_kd,
                          "distill": {"terms": [{"name": "ce", "loss": "token_ce"}]}})
    path = make_cache(recipe, task, model, prepared, tmp_path / "text")
    header = json.loads((path / "header.json").read_text())
    assert header["format"] == "distill-teacher-sequences" and header["num_samples"] == len(prepared.train)
    signal = open_cache(recipe, task, model, prepared, path)
    live = causal_lm.TeacherSequences(model, prepared.train, 4, seed=recipe.data.seed)
    live.write(torch.arange(len(prepared.train)))
    assert torch.equal(signal.sequences.inputs, live.inputs) and torch.equal(signal.sequences.targets, live.targets)
    # a cache is rebuilt in place (on 60ebf64 a token-level cache at the destination was "not a teacher cache")
    assert make_cache(recipe, task, model, prepared, path) == path
    tokens = make_cache(load_recipe(lm_recipe(text_file)), task, model, prepared, tmp_path / "tokens")
    assert make_cache(load_recipe(lm_recipe(text_file)), task, model, prepared, tokens) == tokens
    # other sampling settings, another text: refused, the part named
    hotter = load_recipe({**recipe.model_dump(mode="json"), "task_options": {**sequence_kd, "temperature": 0.5}})
    with pytest.raises(DistillError, match="extra settings differ"):
        open_cache(hotter, task, model, prepared, path)

    # end to end: the live run, then the same recipe with `teacher.cache: auto`
    writes = {"n": 0}
    original = causal_lm.sequence_kd_dataset

    def counted(*args, **kwargs):
        writes["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "sequence_kd_dataset", counted)
    data = {**lm_recipe(text_file), "task_options": sequence_kd, "distill": {"terms": [{"name": "ce", "loss": "token_ce"}]}}
    live_run = run_recipe(load_recipe(data), tmp_path / "live", progress=False)
    data["teacher"] = {**data["teacher"], "cache": "auto"}
    built = writes["n"]
    cached_run = run_recipe(load_recipe(data), tmp_path / "cached", progress=False)
    written_by_cache = writes["n"] - built
    assert written_by_cache == built  # the cache's build wrote the text once; training wrote nothing more
    assert (tmp_path / "cached" / "teacher-cache" / "header.json").is_file()
    assert cached_run.student.metric("perplexity") == live_run.student.metric("perplexity")


# ------------------------------------------------------------------------------ text classification
def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    good, bad = ["good", "great", "fun", "warm", "lovely"], ["bad", "dull", "boring", "awful", "flat"]
    filler = ["the", "movie", "plot", "film", "is", "a", "and", "really", "quite", "story"]
    rows = []
    for i in range(n):
        words = rng.sample(filler, rng.randint(1, 6)) + rng.sample(good if i % 2 else bad, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), i % 2))
    return rows


@pytest.fixture
def sst(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    for name, rows in (("train.tsv", sentences(40, 0)), ("dev.tsv", sentences(8, 1))):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return folder


def text_parts(sst, tmp_path, max_length: int = 16):
    from text_helpers import wordpiece_tokenizer

    from distill.nlp import from_config
    from distill.tasks.base import get_task

    teacher_dir = tmp_path / f"bert-{max_length}"
    if not teacher_dir.exists():
        tok = wordpiece_tokenizer([s for s, _ in sentences(40, 0)], vocab_size=60)
        model = from_config({"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 16,
                             "num_hidden_layers": 2, "max_position_embeddings": 32, "vocab_size": len(tok)},
                            num_labels=2, seed=0)
        model.model.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
    recipe = load_recipe({
        "name": "text", "task": "text-classification", "seeds": [0], "threads": 1,
        "data": {"name": "sst2", "options": {"path": str(sst), "verify": False}, "eval_batch_size": 8},
        "task_options": {"max_length": max_length},
        "teacher": {"model": "hf", "kwargs": {"name_or_path": str(teacher_dir)}, "gate": {"enabled": False}, "pretrained": True,
                    "cache": "auto"},
        "student": {"model": "bilstm", "kwargs": {"embedding_dim": 8, "hidden_size": 8, "fc_size": 8}},
        "train": FAST,
        "distill": {"terms": [{"name": "soft", "loss": "kd", "params": {"temperature": 2.0}},
                              {"name": "hid", "loss": "hint", "student": "embedding", "teacher": "hidden_states.1"}]},
    })
    task = get_task("text-classification")
    prepared = task.prepare(recipe, None)
    return recipe, task, prepared, task.build_model(recipe.teacher, prepared, 0)


def test_text_classifier_cache_packs_the_tokens_and_serves_the_live_teachers_outputs(sst, tmp_path):
    from distill.signals import LiveTeacher
    from distill.stage import make_cache, open_cache

    recipe, task, prepared, teacher = text_parts(sst, tmp_path)
    make_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    cache = open_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    header = cache.header
    loader = prepared.loader("train", 8, shuffle=True, seed=5)
    lengths = loader.sides["teacher"].lengths
    # packed: one row per real token, no padding on disk; logits one row per sentence
    assert header["tokens"] == int(lengths.sum()) < len(lengths) * int(lengths.max())
    assert header["outputs"]["logits"]["per"] == "example" and header["outputs"]["hidden_states.1"]["per"] == "token"
    assert np.load(tmp_path / "cache/1.values.npy").shape == (int(lengths.sum()), 16)
    batch = next(iter(loader))
    got = cache.outputs(batch, ["hidden_states.1"])
    want = LiveTeacher(teacher, feed=task.feed).outputs(batch, ["hidden_states.1"])
    real = batch["teacher.attention_mask"].bool()
    assert bool((~real).any())  # the batch has padding, which the cache fills with zeros
    assert torch.allclose(got["logits"], want["logits"], atol=2e-3)
    assert torch.allclose(got["hidden_states.1"][real], want["hidden_states.1"][real], atol=2e-3)
    assert float(got["hidden_states.1"][~real].abs().max()) == 0.0


def test_text_classifier_cache_of_another_max_length_is_refused(sst, tmp_path):
    from distill.stage import make_cache, open_cache
    from distill.token_cache import TokenCache

    recipe, task, prepared, teacher = text_parts(sst, tmp_path, max_length=16)
    make_cache(recipe, task, teacher, prepared, tmp_path / "cache")
    recipe4, task4, prepared4, teacher4 = text_parts(sst, tmp_path, max_length=4)
    with pytest.raises(DistillError, match="its data and tokenizer differ"):
        open_cache(recipe4, task4, teacher4, prepared4, tmp_path / "cache")
    # without the fingerprint, the lengths are checked on every batch
    cache = TokenCache(tmp_path / "cache", token_mask=task4.cache_token_mask(teacher4))
    batch = next(iter(prepared4.loader("train", 8, shuffle=False)))
    with pytest.raises(DistillError, match="another tokenizer or max_length"):
        cache.outputs(batch, ["hidden_states.1"])


def test_text_classification_run_with_a_cache(sst, tmp_path):
    recipe, *_ = text_parts(sst, tmp_path)
    data = json.loads(recipe.model_dump_json(exclude_none=True))
    # a student on the teacher's tokenizer, so its hidden states line up with the cached ones
    data["student"] = {"model": "hf", "kwargs": {"config": {
        "model_type": "bert", "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8,
        "num_hidden_layers": 2, "max_position_embeddings": 32}}}
    data["distill"]["terms"][1]["student"] = "hidden_states.1"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert 0.0 <= results["student"]["accuracy"] <= 1.0
    header = json.loads((tmp_path / "run/teacher-cache/header.json").read_text())
    assert header["format"] == "distill-token-cache" and set(header["outputs"]) == {"logits", "hidden_states.1"}
    history = json.loads((tmp_path / "run/stages/student-seed0/result.json").read_text())["history"]
    assert {"train_soft", "train_hid"} <= set(history[0])


def test_attention_maps_are_refused_in_one_line_and_nothing_is_left_behind(sst, tmp_path):
    from distill.token_cache import build_token_cache

    recipe, task, prepared, teacher = text_parts(sst, tmp_path)
    with pytest.raises(DistillError, match=r"attentions.0' has shape .* need the live teacher"):
        build_token_cache(teacher, lambda: task.cache_batches(recipe, prepared, 8), tmp_path / "c",
                          num_samples=len(prepared.train), token_mask=task.cache_token_mask(teacher),
                          fingerprint={}, taps=["attentions.0"], feed=task.feed)
    assert not list(tmp_path.glob("c*"))
