"""Round trips back to the ecosystems the students come from, and export of text students: a run's
distilled Hugging Face student is a `save_pretrained` folder that `transformers`' Auto classes load
with the same logits, its static sentence student a Model2Vec folder that `model2vec.StaticModel`
loads with the same embeddings, and `distill export` writes a text classifier (input_ids +
attention_mask, any batch and length) that computes the student's logits. Tiny random models,
tiny tokenizers, generated data: nothing is downloaded."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from text_helpers import wordpiece_tokenizer

from distill.cli import main
from distill.errors import DistillError
from distill.finished_run import FinishedRun
from distill.nlp.sentence import StaticEmbedding, embed

torch.set_num_threads(1)

TINY_BERT = dict(model_type="bert", hidden_size=24, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GOOD = ["good", "great", "fun", "charming", "warm", "lovely"]
BAD = ["bad", "dull", "boring", "awful", "tedious", "weak"]
FILLER = ["the", "movie", "plot", "film", "is", "a", "and", "really", "quite", "story"]
FAST = {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.001, "tensorboard": False}


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(1, 6)) + rng.sample(GOOD if i % 2 else BAD, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), i % 2))
    return rows


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def run_recipe(folder, recipe: dict):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A distilled 1-layer BERT student (the teacher's tokenizer) on 48 generated sentences."""
    from distill.nlp import from_config

    tmp = tmp_path_factory.mktemp("text")
    train, test = sentences(48, 0), sentences(12, 1)
    for name, rows in (("train", train), ("test", test)):
        (tmp / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    tok = wordpiece_tokenizer([s for s, _ in train], vocab_size=60)
    teacher = from_config({**TINY_BERT, "num_hidden_layers": 2, "vocab_size": len(tok)}, num_labels=2, seed=0)
    teacher.model.save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    recipe = {
        "name": "text", "task": "text-classification", "seeds": [0], "threads": 1,
        "data": {"name": "tsv", "options": {"train": str(tmp / "train.tsv"), "test": str(tmp / "test.tsv")},
                 "eval_batch_size": 8},
        "task_options": {"max_length": 16},
        "teacher": {"model": "hf", "pretrained": True, "kwargs": {"name_or_path": str(tmp / "teacher")},
                    "gate": {"enabled": False}},
        "student": {"model": "hf", "kwargs": {"config": {**TINY_BERT, "num_hidden_layers": 1}}},
        "train": FAST, "baseline": {"enabled": False},
        "distill": {"terms": [{"name": "soft", "loss": "kd", "params": {"temperature": 2.0}}]},
        "evaluate": {"latency": False},
    }
    return run_recipe(tmp, recipe), [s for s, _ in test]


def student_logits(run, inputs: dict) -> torch.Tensor:
    student = FinishedRun(run).student()
    with torch.no_grad():
        return student(**inputs).logits


# ------------------------------------------------------------------------------ Hugging Face folders
def test_a_distilled_hf_classifier_loads_back_with_the_auto_classes(text_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, texts = text_run
    folder = run / "stages" / "student-seed0" / "hf"
    assert FinishedRun(run).student_folder() == folder
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.parent.glob(".hf.*"))  # built aside and moved in: nothing left over
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 2
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    run_tokenizer = FinishedRun(run).prepared.tokenizers["teacher"]  # the student reads the teacher's tokens
    assert inputs["input_ids"].tolist() == run_tokenizer(texts, padding=True, truncation=True, max_length=16,
                                                        return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        loaded = model(**inputs).logits
    expected = student_logits(run, dict(inputs))
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    assert loaded.std() > 0  # the logits differ between sentences: the comparison means something


def test_a_distilled_hf_causal_lm_loads_back_with_the_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 6
    (tmp_path / "input.txt").write_text(text)
    recipe = {
        "name": "lm", "task": "causal-lm", "seeds": [0], "threads": 1,
        "data": {"name": "text", "options": {"path": str(tmp_path / "input.txt"), "block_size": 16}},
        "teacher": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                    "train": {**FAST, "batch_size": 8}, "gate": {"enabled": False}},
        "student": {"model": "hf", "kwargs": {"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2,
                                                         "n_embd": 8, "n_positions": 16}}},
        "train": {**FAST, "batch_size": 8}, "baseline": {"enabled": False},
        "distill": {"terms": [{"name": "kd", "loss": "token_fkl"}]}, "evaluate": {"latency": False},
    }
    run = run_recipe(tmp_path, recipe)
    folder = FinishedRun(run).student_folder()
    assert folder.name == "hf" and not (folder / "tokenizer.json").exists()  # character ids: no tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = FinishedRun(run).prepared.data.test.inputs.long()
    with torch.no_grad():
        loaded = model(input_ids=ids).logits
        expected = FinishedRun(run).student()(ids).logits
    assert loaded.shape == (len(ids), 16, 30) and len(ids) > 1
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    # `distill export` of the causal LM: parity on the test blocks themselves (token ids, not random inputs)
    from distill.export import export_source, load_exported

    finished = FinishedRun(run)
    assert torch.equal(finished.example_inputs(3), ids[:3])
    for fmt in ("onnx", "torchscript"):
        result = export_source(finished, fmt)
        assert result.parity.passed and result.parity.samples == len(ids)
        runner = load_exported(fmt, result.path.read_bytes(), finished.fresh_student)
        torch.testing.assert_close(runner(ids[:2]), expected[:2], rtol=1e-4, atol=1e-5)


def test_save_pretrained_replaces_an_old_folder_whole_and_refuses_what_is_no_hf_model(tmp_path):
    from distill.nlp import from_config
    from distill.nlp.hf import save_pretrained

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale.bin").write_text("from an older save")
    model = from_config({**TINY_BERT, "num_hidden_layers": 1, "vocab_size": 30}, num_labels=3, seed=0)
    assert save_pretrained(model, folder) == folder
    assert not (folder / "stale.bin").exists() and (folder / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(DistillError, match="no Hugging Face model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    assert not (tmp_path / "linear").exists()


# ------------------------------------------------------------------------------ export of text students
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_of_a_text_classifier_takes_input_ids_and_mask_of_any_batch_and_length(text_run, fmt, tmp_path):
    run, texts = text_run
    out = tmp_path / f"student.{ {'onnx': 'onnx', 'torchscript': 'pt', 'safetensors': 'safetensors'}[fmt] }"
    report = tmp_path / "export.json"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["parity"]["passed"] and result["parity"]["samples"] == len(texts)
    assert result["metadata"]["input_names"] == ["input_ids", "attention_mask"]
    tokenizer = FinishedRun(run).prepared.tokenizers["teacher"]
    for batch in (texts[:1], texts[:5]):  # one sentence unpadded, then a padded batch of another length
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=16, return_tensors="pt")
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        expected = student_logits(run, inputs)
        if fmt == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
            got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(out))
            got = module(inputs["input_ids"], inputs["attention_mask"])
        else:
            from safetensors.torch import load_file

            student = FinishedRun(run).fresh_student()
            student.load_state_dict(load_file(out))
            with torch.no_grad():
                got = student(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_int8_export_of_a_text_classifier_reports_test_accuracy(text_run, tmp_path, capsys):
    run, texts = text_run
    assert main(["export", str(run), "--format", "torchscript", "--quantize", "int8",
                 "--out", str(tmp_path / "q.pt")]) == 0
    assert f"test accuracy ({len(texts)} samples): fp32" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_bilstm_text_student_exports_with_named_inputs(fmt, tmp_path):
    """A zoo text model (no run needed): packed sequences in eager mode, padded ones in ONNX (which
    has no packing), the same final states for every length."""
    from distill.export import export_model, parity_inputs
    from distill.nlp.bilstm import BiLSTMClassifier

    torch.manual_seed(0)
    model = BiLSTMClassifier(40, 3, embedding_dim=8, hidden_size=6, fc_size=8).eval()
    ids = torch.randint(2, 40, (9, 7))
    mask = torch.ones_like(ids)
    for row, length in enumerate([7, 3, 5, 1, 7, 2, 6, 4, 7]):
        mask[row, length:] = 0
    ids = ids * mask
    batches = parity_inputs({"input_ids": ids, "attention_mask": mask}, batch=4)
    assert [b["input_ids"].shape for b in batches] == [(1, 7), (4, 7), (4, 7)]
    out = tmp_path / f"bilstm.{fmt}"
    result = export_model(model, out, fmt, batches)
    assert result.parity.passed and result.parity.samples == 9
    x, m = ids[1:4, :5], mask[1:4, :5]  # another batch size and length than any checked
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input_ids": x.numpy(), "attention_mask": m.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = torch.jit.load(str(out))(x, m)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x, m), rtol=0, atol=1e-5)


def test_a_failed_onnx_export_of_an_hf_model_names_the_other_ways(text_run, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 17 is not supported")

    run, _ = text_run
    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.onnx")]) == 2
    err = capsys.readouterr().err
    assert "ONNX export of BertForSequenceClassification failed (Exporting the operator" in err
    assert "--format safetensors" in err and "stages/student-seed<N>/hf" in err
    assert not (tmp_path / "s.onnx").exists()


def test_parity_inputs_cut_named_inputs_to_each_batchs_longest_row():
    from distill.export import parity_inputs

    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    parts = parity_inputs({"input_ids": ids, "attention_mask": mask}, batch=2)
    assert [p["input_ids"].shape[1] for p in parts] == [2, 3, 5]
    assert parts[2]["input_ids"].tolist() == ids[3:, :5].tolist()


# ------------------------------------------------------------------------------ Model2Vec folders
def m2v_tokenizer():
    texts = [s for s, _ in sentences(40, 2)]
    return wordpiece_tokenizer(texts, vocab_size=60), texts


def test_a_static_embedding_saved_for_model2vec_embeds_the_same(tmp_path):
    from model2vec import StaticModel

    tok, texts = m2v_tokenizer()
    model = StaticEmbedding.from_vectors(torch.randn(len(tok), 12, generator=torch.Generator().manual_seed(0)), tok)
    with torch.no_grad():  # trained rows of the special tokens must not matter: both leave them out
        model.embedding.weight[tok.cls_token_id] += 3.0
        model.embedding.weight[tok.unk_token_id] += 3.0
    sentences_ = texts[:6] + ["an unseen wordzz $$ and the movie", "zzzz"]
    folder = model.save_model2vec(tmp_path / "m2v", tok, max_length=64)
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "tokenizer.json", "config.json",
                                                   "modules.json"}
    loaded = StaticModel.from_pretrained(folder)
    assert loaded.normalize is True and loaded.dim == 12
    theirs = torch.from_numpy(loaded.encode(sentences_))
    ours = embed(model, tok, sentences_)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert ours[:-1].norm(dim=-1).min() > 0.99  # not all zero: the comparison means something
    assert ours[-1].abs().sum() == 0  # "zzzz" is one unknown token, left out: nothing to average
    unnormalised = StaticEmbedding.from_vectors(model.embedding.weight.detach(), tok, normalize=False)
    loaded = StaticModel.from_pretrained(unnormalised.save_model2vec(tmp_path / "raw", tok))
    torch.testing.assert_close(torch.from_numpy(loaded.encode(sentences_)), embed(unnormalised, tok, sentences_),
                               rtol=0, atol=1e-6)


def test_save_model2vec_refuses_what_model2vec_would_embed_differently(tmp_path):
    tok, _ = m2v_tokenizer()
    with pytest.raises(DistillError, match="one row per token"):
        StaticEmbedding(len(tok) + 1, 4).save_model2vec(tmp_path / "a", tok)
    with pytest.raises(DistillError, match="skip_ids"):
        StaticEmbedding(len(tok), 4).save_model2vec(tmp_path / "b", tok)  # averages [CLS] and [SEP] in
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_static_sentence_run_saves_a_model2vec_folder(tmp_path):
    from model2vec import StaticModel

    from distill.nlp import from_config

    tok, texts = m2v_tokenizer()
    teacher = from_config({**TINY_BERT, "num_hidden_layers": 1, "vocab_size": len(tok)}, task="base", seed=0)
    teacher.model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "stsb").mkdir()
    for split, start in (("train", 0), ("dev", 8), ("test", 12)):
        lines = [f"main-captions\tMSRvid\t2012\t{i:04d}\t{(i % 5):.3f}\t{texts[2 * i]}\t{texts[2 * i + 1]}"
                 for i in range(start, start + 8)]
        (tmp_path / "stsb" / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")
    recipe = {
        "name": "static", "task": "sentence-embedding", "seeds": [0], "threads": 1,
        "data": {"name": "stsb", "options": {"path": str(tmp_path / "stsb"), "verify": False}},
        "task_options": {"max_length": 32},
        "teacher": {"model": "hf", "pretrained": True, "kwargs": {"name_or_path": str(tmp_path / "teacher")},
                    "gate": {"enabled": False}},
        "student": {"model": "static-embedding", "kwargs": {"init": "teacher"}},
        "train": {**FAST, "batch_size": 4, "lr": 0.05}, "baseline": {"enabled": False},
        "distill": {"terms": [{"name": "emb", "loss": "embedding_cosine"}]}, "evaluate": {"latency": False},
    }
    run = run_recipe(tmp_path, recipe)
    folder = FinishedRun(run).student_folder()
    assert folder == run / "stages" / "student-seed0" / "model2vec"
    assert json.loads((folder / "config.json").read_text())["max_length"] == 30  # 32 less [CLS] and [SEP]
    student = FinishedRun(run).student()
    assert student.embedding.weight[tok.cls_token_id].abs().sum() == 0  # skipped, so never trained
    theirs = torch.from_numpy(StaticModel.from_pretrained(folder).encode(texts[:10]))
    torch.testing.assert_close(theirs, embed(student, tok, texts[:10]), rtol=0, atol=1e-6)


def test_a_causal_lm_on_gpt2_tokens_saves_a_tokenizer_that_gives_the_datas_ids(shared, tmp_path):
    """The hf/ folder of a causal LM trained on GPT-2 BPE tokens holds a tokenizer that maps text to
    the ids the data set was made of (character vocabularies have no tokenizer to save)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from distill.data.tinyshakespeare import gpt2_tokenizer
    from distill.tasks.base import get_task

    task = get_task("causal-lm")
    folder = shared / "gpt2-tokenizer"
    tok = task.tokenizer_of(None, SimpleNamespace(data=SimpleNamespace(extra={"tokenizer_path": str(folder)})))
    tok.save_pretrained(tmp_path)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == gpt2_tokenizer(folder).encode(text).ids
    assert task.tokenizer_of(None, SimpleNamespace(data=SimpleNamespace(extra={"tokenizer": "char"}))) is None
