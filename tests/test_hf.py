"""Hugging Face and text classification: taps by layer, per-side tokenizers and feeds, the HF
Trainer integration, SST-2, and the error without the nlp extra. Tiny random models built from
configs: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import math
import sys
import zipfile

import pytest
import torch
from text_helpers import wordpiece_tokenizer

from distill import Distiller, DistillError, LiveTeacher, Taps, Term
from distill.nlp import (
    BiLSTMClassifier, TextDataset, TextFeed, TextLoader, layer_map_terms, load_sst2, uniform_layer_map,
)

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None,
    reason="transformers/tokenizers not installed: pip install -e .[test]",
)

TEXTS = [
    "a good movie", "a bad movie", "not good at all", "really great fun", "boring and bad",
    "i loved it", "the plot is a mess", "charming , funny and warm", "dull", "an absolute delight",
]
LABELS = [1, 0, 0, 1, 0, 1, 0, 1, 0, 1]
TINY = dict(
    model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def tokenizers():
    from distill.nlp import word_tokenizer

    return {"teacher": wordpiece_tokenizer(TEXTS), "student": word_tokenizer(TEXTS)}


def tiny(vocab_size: int, seed: int, **overrides):
    from distill.nlp import from_config

    return from_config({**TINY, "vocab_size": vocab_size, **overrides}, num_labels=2, seed=seed)


# --- taps by layer -------------------------------------------------------------------------------

@needs_transformers
def test_hidden_state_and_attention_taps_have_hf_shapes_and_values(tokenizers):
    tok = tokenizers["teacher"]
    model = tiny(len(tok), seed=0).eval()
    batch = TextLoader(TextDataset(TEXTS[:4], LABELS[:4]), tok, batch_size=4, shuffle=False).collate(torch.arange(4))
    inputs = TextFeed().inputs(batch)
    B, T = inputs["input_ids"].shape
    names = ["hidden_states.0", "hidden_states.2", "attentions.0", "attentions.1", "model.bert.encoder.layer.1"]
    with torch.no_grad():
        captured = Taps(model, names).run(TextFeed(), model, batch)
        reference = model.model(**inputs, output_hidden_states=True)
    assert captured["hidden_states.0"].shape == (B, T, 32)
    assert captured["attentions.1"].shape == (B, 2, T, T)
    assert captured["logits"].shape == (B, 2)
    torch.testing.assert_close(captured["hidden_states.2"], reference.hidden_states[2])
    torch.testing.assert_close(captured["hidden_states.2"], captured["model.bert.encoder.layer.1"])
    torch.testing.assert_close(captured["logits"], reference.logits)
    # probabilities: each query row sums to 1, and padded keys get none
    attention = captured["attentions.0"]
    torch.testing.assert_close(attention.sum(-1), torch.ones(B, 2, T))
    padded = inputs["attention_mask"] == 0
    assert padded.any() and attention.permute(0, 1, 3, 2)[padded[:, None, :].expand(B, 2, T)].abs().max() < 1e-6
    assert model.feature_taps == ["hidden_states.1", "hidden_states.2"]


@needs_transformers
def test_misspelled_layer_tap_names_the_nearest(tokenizers):
    model = tiny(len(tokenizers["teacher"]), seed=0)
    with pytest.raises(DistillError, match="nearest: hidden_states"):
        Taps(model, ["hidden_state.1"], owner="student")


@needs_transformers
def test_taps_off_means_no_extra_outputs(tokenizers):
    tok = tokenizers["teacher"]
    model = tiny(len(tok), seed=0).eval()
    batch = TextLoader(TextDataset(TEXTS[:2], LABELS[:2]), tok, batch_size=2, shuffle=False).collate(torch.arange(2))
    out = TextFeed()(model, batch)
    assert out.hidden_states is None and out.attentions is None


# --- distilling HF models ------------------------------------------------------------------------

@needs_transformers
def test_distiller_with_layer_map_hints_attention_and_kd_dry_runs_cleanly(tokenizers):
    tok = tokenizers["teacher"]
    teacher = tiny(len(tok), seed=0, num_hidden_layers=4)
    student = tiny(len(tok), seed=1, hidden_size=16)
    terms = [Term("hard", "ce", weight=0.5), Term("soft", "kd", weight=0.5, params={"temperature": 2.0})]
    terms += layer_map_terms(student_layers=2, teacher_layers=4)
    assert [t.name for t in terms[2:]] == ["hidden0", "hidden1", "attention1", "hidden2", "attention2"]
    assert (terms[5].student, terms[5].teacher) == ("hidden_states.2", "hidden_states.4")
    assert (terms[6].student, terms[6].teacher) == ("attentions.1", "attentions.3")
    loader = TextLoader(TextDataset(TEXTS, LABELS), tok, batch_size=5, shuffle=True)
    distiller = Distiller(student, teacher, terms, feed=TextFeed())
    report = distiller.dry_run(next(iter(loader)))
    assert report.problems == []
    assert report.adapters["hidden1"].startswith("Linear") and report.adapters["attention1"].startswith("Identity")
    assert all(math.isfinite(v) and v > 0 for v in report.terms.values())
    out = distiller(next(iter(loader)))
    out.loss.backward()
    assert student.model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@needs_transformers
def test_each_side_reads_its_own_tokenizer(tokenizers):
    t_tok, s_tok = tokenizers["teacher"], tokenizers["student"]
    assert len(s_tok) < len(t_tok)
    teacher = tiny(len(t_tok), seed=0)
    student = tiny(len(s_tok), seed=1, hidden_size=16)
    loader = TextLoader(TextDataset(TEXTS, LABELS), {"student": s_tok, "teacher": t_tok}, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    # the teacher's ids: word pieces between [CLS] and [SEP], some beyond the student's vocabulary
    assert batch["teacher.input_ids"].shape[1] >= batch["student.input_ids"].shape[1] + 2
    assert torch.all(batch["teacher.input_ids"][:, 0] == t_tok.cls_token_id)
    assert int(batch["teacher.input_ids"].max()) >= len(s_tok) > int(batch["student.input_ids"].max())
    assert "teacher.token_type_ids" in batch and "student.token_type_ids" not in batch
    terms = [Term("soft", "kd", params={"temperature": 2.0}),
             Term("pooled", "hint", student="model.bert.pooler", teacher="model.bert.pooler")]
    distiller = Distiller(student, teacher, terms, feed=TextFeed("student"), teacher_feed=TextFeed("teacher"))
    report = distiller.dry_run(batch)
    assert report.problems == []
    assert report.student_taps["model.bert.pooler"] == (4, 16) and report.teacher_taps["model.bert.pooler"] == (4, 32)
    # token-level terms need one tokenizer: lengths differ, and the adapter says so
    token_level = [Term("h", "hint", student="hidden_states.2", teacher="hidden_states.2")]
    wrong = Distiller(student, LiveTeacher(teacher, feed=TextFeed("teacher")), token_level, feed=TextFeed("student"))
    with pytest.raises(DistillError, match="all but the last dimension must agree"):
        wrong.dry_run(batch)


def test_text_feed_picks_its_side_then_plain_keys_and_says_what_is_missing():
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"teacher.input_ids": ids, "input_ids": ids * 2, "attention_mask": ids, "target": ids[:, 0]}
    assert TextFeed("teacher").inputs(batch) == {"input_ids": ids}
    assert set(TextFeed("student").inputs(batch)) == {"input_ids", "attention_mask"}
    with pytest.raises(DistillError, match="no token ids for student.*'student.input_ids'.*it has target"):
        TextFeed("student")({}, {"target": ids[:, 0]})


def test_bilstm_ignores_padding_and_takes_hf_style_inputs():
    torch.manual_seed(0)
    model = BiLSTMClassifier(vocab_size=20, embedding_dim=8, hidden_size=6, fc_size=5).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
    mask = (ids != 0).long()
    with torch.no_grad():
        padded = TextFeed()(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask * 0})
        alone = model(input_ids=ids[:1, :3])
    assert padded.shape == (2, 2)
    torch.testing.assert_close(padded[:1], alone)


# --- the loader ----------------------------------------------------------------------------------

@needs_transformers
def test_text_loader_is_deterministic_covers_every_sample_and_groups_by_length(tokenizers):
    texts = [" ".join(["good"] * (1 + i % 9)) for i in range(90)]
    data = TextDataset(texts, [i % 2 for i in range(90)])
    tok = tokenizers["teacher"]
    plain = TextLoader(data, tok, batch_size=8, shuffle=True, seed=3)
    grouped = TextLoader(data, tok, batch_size=8, shuffle=True, seed=3, group_by_length=True)
    for loader in (plain, grouped):
        loader.set_epoch(2)
        first = [b["index"] for b in loader]
        assert all(torch.equal(a, b["index"]) for a, b in zip(first, loader))
        assert sorted(torch.cat(first).tolist()) == list(range(90)) and len(first) == len(loader) == 12
        halves = [TextLoader(data, tok, batch_size=8, shuffle=True, seed=3, rank=r, world_size=2,
                             group_by_length=loader.group_by_length) for r in (0, 1)]
        for h in halves:
            h.set_epoch(2)
        for whole, a, b in zip(first, *halves):
            assert torch.equal(torch.cat([a["index"], b["index"]]).sort().values, whole.sort().values)
    padding = {name: sum(int((b["attention_mask"] == 0).sum()) for b in loader)
               for name, loader in (("plain", plain), ("grouped", grouped))}
    assert padding["grouped"] < padding["plain"] / 2
    batch = next(iter(plain))
    lengths = batch["attention_mask"].sum(-1)
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id)
    assert torch.equal(lengths, torch.tensor([len(tok(texts[i])["input_ids"]) for i in batch["index"]]))


# --- SST-2 -----------------------------------------------------------------------------------------

def test_sst2_from_a_folder_a_zip_and_a_download(shared, tmp_path):
    splits = load_sst2(shared / "sst2")
    assert (len(splits.train), len(splits.test), splits.num_classes) == (67_349, 872, 2)
    assert splits.train.texts[1] == "contains no wit , only labored gags" and int(splits.train.targets[1]) == 0
    assert 0.5 < float(splits.test.targets.float().mean()) < 0.52
    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("train.tsv", "dev.tsv"):
            zf.write(shared / "sst2" / name, f"SST-2/{name}")
    assert load_sst2(archive).test.texts == splits.test.texts
    downloaded = load_sst2(data_dir=tmp_path / "data", url=archive.as_uri())
    assert downloaded.train.texts == splits.train.texts
    assert sorted(p.name for p in (tmp_path / "data" / "sst2").iterdir()) == ["dev.tsv", "train.tsv"]
    # a download whose files differ is refused, and nothing of it is kept
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(shared / "sst2" / "train.tsv", "SST-2/train.tsv")
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\nchanged\t1\n")
    with pytest.raises(DistillError, match="dev.tsv in .* has sha256"):
        load_sst2(data_dir=tmp_path / "other", url=bad.as_uri())
    assert sorted(p.name for p in (tmp_path / "other" / "sst2").iterdir()) == ["train.tsv"]


def test_sst2_refuses_a_changed_file(shared, tmp_path):
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_bytes((shared / "sst2" / name).read_bytes())
    with open(tmp_path / "dev.tsv", "a") as f:
        f.write("an extra line\t1\n")
    with pytest.raises(DistillError, match="dev.tsv differs from GLUE's SST-2"):
        load_sst2(tmp_path)
    assert len(load_sst2(tmp_path, verify=False).test) == 873
    with pytest.raises(DistillError, match="neither a folder"):
        load_sst2(tmp_path / "missing")


def test_uniform_layer_map():
    assert uniform_layer_map(2, 6) == {0: 0, 1: 3, 2: 6}
    assert uniform_layer_map(4, 12) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    with pytest.raises(DistillError, match="student layers <= teacher layers"):
        uniform_layer_map(6, 2)
    with pytest.raises(DistillError, match="0 \\(the embeddings\\) maps to 0 only"):
        layer_map_terms(2, 6, layer_map={0: 1})


# --- loading ---------------------------------------------------------------------------------------

@needs_transformers
def test_load_pretrained_from_a_local_folder_offline(tokenizers, tmp_path, monkeypatch):
    from distill.nlp import load_pretrained

    tok = tokenizers["teacher"]
    model = tiny(len(tok), seed=0).eval()
    model.model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, loaded_tok = load_pretrained(tmp_path, num_labels=2, attentions=True)
    loader = TextLoader(TextDataset(TEXTS[:3], LABELS[:3]), loaded_tok, batch_size=3, shuffle=False)
    batch = loader.collate(torch.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(TextFeed()(loaded.eval(), batch).logits, TextFeed()(model, batch).logits)
    assert loaded.config._attn_implementation == "eager"
    with pytest.raises(DistillError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_missing_transformers_names_the_extra(monkeypatch):
    import distill.nlp
    from distill.nlp import from_config, load_pretrained, word_tokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    monkeypatch.delitem(sys.modules, "distill.nlp.hf_trainer", raising=False)
    for attempt in (lambda: load_pretrained("some/model"), lambda: from_config({"model_type": "bert"}),
                    lambda: word_tokenizer(TEXTS), lambda: distill.nlp.DistillTrainer):
        with pytest.raises(DistillError, match=r"pip install distill\[nlp\]"):
            attempt()


# --- the Hugging Face Trainer ----------------------------------------------------------------------

@needs_transformers
def test_distill_trainer_logs_each_term_and_lowers_the_loss(tokenizers, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from distill.nlp import DistillTrainer

    tok = tokenizers["teacher"]
    teacher = tiny(len(tok), seed=0, num_hidden_layers=4)
    student = tiny(len(tok), seed=1, hidden_size=16)
    enc = tok(TEXTS[:4])
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": LABELS[i]}
            for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    terms = [Term("hard", "ce", weight=0.5), Term("soft", "kd", weight=0.5, params={"temperature": 2.0}),
             Term("hidden2", "hint", student="hidden_states.2", teacher="hidden_states.4")]
    trainer = DistillTrainer(model=student, teacher=teacher, terms=terms, args=args, train_dataset=data,
                             data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    losses = [row["loss"] for row in logs]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] > losses[1] > losses[2]
    assert all({"hard", "soft", "hidden2"} <= set(row) for row in logs)
    # the hint's adapter trained with the student; the teacher did not move
    adapter = trainer.distiller.adapters["hidden2"]
    assert any(adapter.weight is p for group in trainer.optimizer.param_groups for p in group["params"])
    assert all(not p.requires_grad for p in teacher.parameters())
    trainer.save_model(str(tmp_path / "student"))
    assert (tmp_path / "student" / "config.json").exists() and (tmp_path / "student" / "model.safetensors").exists()


@needs_transformers
def test_distill_trainer_with_a_tokenizer_per_side(tokenizers, tmp_path):
    from transformers import TrainingArguments

    from distill.nlp import DistillTrainer, TextCollator

    t_tok, s_tok = tokenizers["teacher"], tokenizers["student"]
    teacher = tiny(len(t_tok), seed=0)
    student = tiny(len(s_tok), seed=1, hidden_size=16)
    collator = TextCollator({"student": s_tok, "teacher": t_tok})
    data = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    batch = collator(data[:3])
    assert set(batch) == {"student.input_ids", "student.attention_mask", "teacher.input_ids",
                          "teacher.attention_mask", "teacher.token_type_ids", "labels"}
    terms = [Term("soft", "kd", params={"temperature": 2.0}), Term("hard", "ce")]
    options = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=5, report_to=[],
                   use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = DistillTrainer(model=student, teacher=teacher, args=TrainingArguments(**options), train_dataset=data,
                             data_collator=collator, terms=terms)
    with pytest.raises(DistillError, match="remove_unused_columns=False"):
        trainer.train()
    trainer = DistillTrainer(model=student, teacher=teacher, train_dataset=data, data_collator=collator, terms=terms,
                             args=TrainingArguments(**options, remove_unused_columns=False))
    trainer.train()
    assert [row["step"] for row in trainer.state.log_history if "soft" in row] == [1, 2]
