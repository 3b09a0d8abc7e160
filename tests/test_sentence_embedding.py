"""Sentence embeddings: STS-B reading, Spearman with ties, pooling, the losses, the static student,
and the `sentence-embedding` task end to end on tiny random models (no download)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from distill import Distiller, LiveTeacher, Term
from distill.cli import main
from distill.errors import DistillError
from distill.losses import get_loss
from distill.nlp.feed import TextFeed
from distill.nlp.sentence import (
    SentenceEncoder, StaticEmbedding, embed, keep_layers, mean_pool, sif_weights, token_vectors, truncated_encoder,
)
from distill.nlp.stsb import (
    SentencePairs, average_ranks, pearson, read_stsb, read_stsb_file, similarity_correlations, spearman,
)
import distill.tasks.sentence_embedding  # noqa: F401  (registers the task and the `stsb` data set)

TINY = dict(
    model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
PAIRS = [
    ("a man is playing a guitar", "a man plays the guitar", 4.8),
    ("a woman is slicing an onion", "a woman cuts an onion", 4.2),
    ("a dog runs in the park", "a cat sleeps on the sofa", 0.6),
    ("two children are playing football", "kids play soccer outside", 3.6),
    ("the stock market fell today", "a man is playing a flute", 0.0),
    ("a girl is brushing her hair", "a girl is styling her hair", 2.5),
    ("a plane is taking off", "an airplane departs", 4.4),
    ("someone is cooking rice", "the market rose sharply", 0.2),
]
TEXTS = [s for a, b, _ in PAIRS for s in (a, b)]


def bert_tokenizer(texts):
    """A tiny BERT-like tokenizer: word pieces, [CLS] ... [SEP], [PAD] = 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@pytest.fixture(scope="module")
def tok():
    return bert_tokenizer(TEXTS)


def encoder(tok, seed=0, **overrides) -> SentenceEncoder:
    from distill.nlp import from_config

    return SentenceEncoder(from_config({**TINY, "vocab_size": len(tok), **overrides}, task="base", seed=seed).model)


# --- STS-B and Spearman --------------------------------------------------------------------------

def test_average_ranks_and_spearman_with_ties_match_a_hand_computation():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 3.0, 2.0])).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]
    # x ranks [1, 2.5, 2.5, 4], y ranks [2, 1, 3.5, 3.5]; centred: [-1.5, 0, 0, 1.5] and [-0.5, -1.5, 1, 1]
    # Pearson of the ranks = (0.75 + 1.5) / sqrt(4.5 * 4.5) = 0.5 (scipy.stats.spearmanr gives 0.5 too)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([5.0, 1.0, 7.0, 7.0])) == pytest.approx(0.5)
    assert spearman(torch.arange(6.0), torch.arange(6.0) ** 3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(torch.arange(6.0), -torch.arange(6.0)) == pytest.approx(-1.0)
    assert pearson(torch.arange(6.0), torch.arange(6.0) ** 3) < 0.95
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))  # a constant has no ranking
    with pytest.raises(DistillError, match="equal length"):
        spearman(torch.ones(3), torch.ones(4))


def test_similarity_correlations_score_cosines_against_gold():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cosines 1, 0.707, 0
    assert similarity_correlations(a, b, torch.tensor([5.0, 3.0, 1.0]))["spearman"] == pytest.approx(1.0)
    assert similarity_correlations(a, b, torch.tensor([1.0, 3.0, 5.0]))["spearman"] == pytest.approx(-1.0)


def test_real_stsb_files_read_with_official_counts_and_extra_columns(shared):
    splits = read_stsb(shared / "stsb")
    assert {k: len(v) for k, v in splits.items()} == {"train": 5749, "dev": 1500, "test": 1379}
    test = splits["test"]
    assert test.first[0] == "A girl is styling her hair." and test.second[0] == "A girl is brushing her hair."
    assert float(test.scores[0]) == 2.5 and 0.0 <= float(test.scores.min()) and float(test.scores.max()) <= 5.0
    assert all("\t" not in s for s in test.first + test.second)


def test_stsb_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad.csv").write_text("g\tf\t2012\t1\tfive\ta\tb\n")
    with pytest.raises(DistillError, match="not a number"):
        read_stsb_file(tmp_path / "bad.csv")
    with pytest.raises(DistillError, match="lacks sts-train.csv"):
        read_stsb(tmp_path)


# --- pooling and models --------------------------------------------------------------------------

def test_mean_pool_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [-9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_pool(tokens, mask).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    assert mean_pool(tokens, torch.zeros(2, 3)).abs().sum() == 0  # no token: zeros, not nan


def test_encoder_embedding_is_unit_length_and_independent_of_padding(tok):
    model = encoder(tok).eval()
    alone = embed(model, tok, ["a dog runs in the park"], batch_size=1)
    padded = embed(model, tok, ["a dog runs in the park", "two children are playing football outside today"])
    assert alone.shape == (1, 32)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)  # padding to a longer sentence changes nothing
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_encoder_taps_hidden_states_and_keep_layers_copies_the_chosen_layers(tok):
    teacher = encoder(tok, num_hidden_layers=3)
    student = truncated_encoder(teacher, [0, 2])
    assert student.num_layers == 2 and teacher.num_layers == 3  # the teacher is left whole
    assert torch.equal(student.model.encoder.layer[1].output.dense.weight, teacher.model.encoder.layer[2].output.dense.weight)
    batch = tok(TEXTS[:4], padding=True, return_tensors="pt")
    terms = [Term("emb", "embedding_cosine"),
             Term("hid", "hint", student="hidden_states.2", teacher="hidden_states.3")]
    distiller = Distiller(student, LiveTeacher(teacher, feed=TextFeed()), terms, feed=TextFeed())
    report = distiller.dry_run(dict(batch))
    assert not report.problems, report.problems
    assert report.student_taps["hidden_states.2"] == (4, batch["input_ids"].shape[1], 32)
    with pytest.raises(DistillError, match="increasing"):
        keep_layers(encoder(tok).model, [1, 0])


def test_static_embedding_averages_real_tokens_only():
    model = StaticEmbedding(vocab_size=5, dim=2, padding_idx=0, normalize=False)
    with torch.no_grad():
        model.embedding.weight.copy_(torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [7.0, 7.0]]))
    ids = torch.tensor([[1, 2, 3], [1, 4, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # position 2 of row 0 is masked though it is not [PAD]
    assert model(ids, mask).tolist() == [[0.5, 0.5], [4.0, 3.5]]
    assert torch.allclose(model(ids), torch.tensor([[4 / 3, 4 / 3], [4.0, 3.5]]))  # no mask: [PAD] still left out
    assert torch.allclose(StaticEmbedding(5, 2)(ids, mask).norm(dim=-1), torch.ones(2))


def test_static_embedding_from_encoder_reads_each_tokens_output(tok):
    teacher = encoder(tok).eval()
    static = StaticEmbedding.from_encoder(teacher, tok, batch_size=16)
    assert static.vocab_size == len(tok) and static.embedding.embedding_dim == 32
    word = tok.convert_tokens_to_ids("guitar")
    teacher_alone = SentenceEncoder(teacher.model, normalize=False).eval()
    with torch.no_grad():
        expected = teacher_alone(torch.tensor([[tok.cls_token_id, word, tok.sep_token_id]]))[0]
    assert torch.allclose(static.embedding.weight[word], expected, atol=1e-5)
    assert static.embedding.weight[tok.cls_token_id].abs().sum() == 0  # special tokens start at zero
    assert token_vectors(teacher, tok).shape == (len(tok), 32)
    assert StaticEmbedding.from_encoder(teacher, tok, dim=8).embedding.embedding_dim == 8  # PCA
    ones = len(tok) - 5
    weights = sif_weights(torch.tensor([0, 0, 0, 0] + [1] * ones + [ones]), coefficient=0.01)  # last: p = 1/2
    assert float(weights[0]) == 1.0 and float(weights[-1]) == pytest.approx(0.01 / (0.01 + 0.5))
    weighted = StaticEmbedding.from_vectors(token_vectors(teacher, tok), tok, token_weights=weights)
    assert torch.allclose(weighted.embedding.weight[-1], static.embedding.weight[-1] * weights[-1])


# --- losses ----------------------------------------------------------------------------------------

def test_embedding_cosine_is_zero_on_equal_directions_and_trains_the_student():
    loss = get_loss("embedding_cosine").fn
    teacher = torch.randn(4, 8)
    assert float(loss(3.0 * teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(-teacher, teacher)) == pytest.approx(2.0, abs=1e-6)
    student = torch.randn(4, 8, requires_grad=True)
    loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(4, 7), teacher)


def test_pair_cosine_regresses_scores_and_skips_unscored_pairs():
    loss = get_loss("pair_cosine").fn
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pairs = torch.stack([u, v], 1).reshape(6, 2)  # interleaved: u0, v0, u1, v1, ...
    assert float(loss(pairs, torch.tensor([5.0, 0.0, float("nan")]))) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(pairs, torch.tensor([0.0, 0.0, float("nan")]))) == pytest.approx(0.5)  # (1 - 0)^2 / 2
    embeddings = torch.randn(6, 4, requires_grad=True)
    loss(embeddings, torch.tensor([5.0, 1.0, float("nan")])).backward()
    assert embeddings.grad[:4].abs().sum() > 0 and embeddings.grad[4:].abs().sum() == 0  # unscored: no gradient
    assert float(loss(pairs, torch.full((3,), float("nan")))) == 0.0
    with pytest.raises(ValueError, match="2B"):
        loss(torch.randn(5, 2), torch.ones(3))


# --- the task, end to end -------------------------------------------------------------------------

def write_stsb(folder, pairs_by_split):
    folder.mkdir()
    for split, pairs in pairs_by_split.items():
        lines = [f"main-captions\tMSRvid\t2012\t{i:04d}\t{s:.3f}\t{a}\t{b}" + ("\textra\tcols" if i % 3 == 0 else "")
                 for i, (a, b, s) in enumerate(pairs)]
        (folder / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_setup(tmp_path, tok):
    teacher_dir = tmp_path / "teacher"
    encoder(tok, seed=1).model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    write_stsb(tmp_path / "stsb", {"train": PAIRS, "dev": PAIRS[:4], "test": PAIRS[2:]})
    (tmp_path / "extra.txt").write_text("the dog sleeps\na man cooks rice\nkids play\n")
    return tmp_path


def run_task(tmp_path, student: dict, name: str) -> dict:
    recipe = {
        "name": name, "task": "sentence-embedding", "seeds": [0], "threads": 1,
        "data": {"name": "stsb", "options": {"path": str(tmp_path / "stsb"), "verify": False}},
        "task_options": {"extra_sentences": [str(tmp_path / "extra.txt")], "validation": True},
        "teacher": {"model": "hf", "pretrained": True, "kwargs": {"name_or_path": str(tmp_path / "teacher")},
                    "gate": {"enabled": False}},
        "student": student,
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "tensorboard": False, "monitor": "val_spearman"},
        "baseline": {"terms": [{"name": "pairs", "loss": "pair_cosine"}]},
        "distill": {"terms": [{"name": "emb", "loss": "embedding_cosine"}]},
        "evaluate": {"latency_repeats": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "results.json").read_text())


def test_sentence_embedding_recipe_end_to_end_with_a_truncated_encoder(tiny_setup):
    student = {"model": "hf", "kwargs": {"layers": [1]}}  # the teacher's second layer only
    results = run_task(tiny_setup, student, "trunc")
    assert results["task"] == "sentence-embedding" and results["primary_metric"] == "spearman"
    for role in ("teacher", "baseline", "student"):
        assert -1.0 <= results[role]["spearman"] <= 1.0 and "pearson" in results[role]
    assert results["teacher"]["params"] > results["student"]["params"]
    assert 0.0 < results["student"]["agreement"] <= 1.0
    history = json.loads((tiny_setup / "trunc" / "stages" / "student-seed0" / "result.json").read_text())["history"]
    assert history[-1]["train_emb"] < history[0]["train_emb"]  # the student moves toward the teacher
    assert "val_spearman" in history[0]
    assert "spearman %" in (tiny_setup / "trunc" / "report.md").read_text()


def test_sentence_embedding_recipe_end_to_end_with_a_static_student(tiny_setup):
    results = run_task(tiny_setup, {"model": "static-embedding", "kwargs": {"init": "teacher", "sif": 0.001}}, "static")
    assert results["data"] == "stsb"
    assert results["student"]["params"] == 120 * 32 or results["student"]["params"] < results["teacher"]["params"]
    assert -1.0 <= results["student"]["spearman"] <= 1.0
    assert results["student"]["agreement"] > 0.0


def test_task_names_what_is_missing(tiny_setup):
    from distill.recipes import load_recipe
    from distill.tasks.base import get_task

    recipe = load_recipe({
        "task": "sentence-embedding", "data": {"name": "stsb", "options": {"path": str(tiny_setup / "stsb"), "verify": False}},
        "teacher": {"model": "hf", "kwargs": {"config": TINY}, "train": {"epochs": 1}}, "student": {"model": "hf"},
        "distill": {"terms": [{"loss": "embedding_cosine"}]},
    })
    with pytest.raises(DistillError, match="needs a tokenizer"):
        get_task("sentence-embedding").prepare(recipe, None)
    with pytest.raises(DistillError, match="sentence-embedding has no option max_len; accepted: tokenizer"):
        load_recipe({**recipe.model_dump(), "task_options": {"max_len": 8}})
    with pytest.raises(DistillError, match="official file"):
        read_stsb(tiny_setup / "stsb")


def test_check_run_and_sweep_trial_build_the_same_sentence_embedding_stage(tiny_setup, recorded_stages):
    """One stage (issue 14): `distill check`, `distill run` and a sweep trial of a sentence-embedding
    recipe assemble the same terms, transforms, teacher signal and monitor."""
    from distill.check import check_recipe
    from distill.recipes import load_recipe
    from distill.sweep import train_trial

    run_task(tiny_setup, {"model": "hf", "kwargs": {"layers": [1]}}, "same")
    recipe = load_recipe(str(tiny_setup / "same.yaml"))
    from_run = dict(recorded_stages["student-seed0"])
    check_recipe(recipe)
    train_trial(recipe)
    assert from_run == recorded_stages["distill"] == recorded_stages["trial"]
    assert from_run["terms"] == [("emb", "embedding_cosine", 1.0, {})]
    assert from_run["signal"] == "LiveTeacher" and from_run["monitor"] == "val_spearman"


def test_the_teacher_cache_serves_sentence_embeddings(tiny_setup):
    """`distill cache` / `teacher.cache` for sentence embeddings (issue 16): every training sentence's
    teacher embedding stored once, looked up by the batch's sentence numbers; equal to the live
    teacher's; a run with `teacher.cache: auto` trains from it."""
    from distill.recipes import load_recipe
    from distill.signals import LiveTeacher
    from distill.stage import make_cache, open_cache
    from distill.tasks.base import get_task

    run_task(tiny_setup, {"model": "hf", "kwargs": {"layers": [1]}}, "live")
    data = yaml.safe_load((tiny_setup / "live.yaml").read_text())
    recipe = load_recipe(data)
    task = get_task("sentence-embedding")
    prepared = task.prepare(recipe, None)
    teacher = task.build_model(recipe.teacher, prepared, 0)
    path = make_cache(recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"cache_dtype": "fp32"})}),
                      task, teacher, prepared, tiny_setup / "cache")
    cached, live = open_cache(recipe, task, teacher, prepared, path), LiveTeacher(teacher, feed=task.feed)
    batch = next(iter(task.train_loader(recipe, prepared, 3, 0)))
    first, second = batch["index"][::2], batch["index"][1::2]  # pair p's sentences are 2p and 2p + 1
    assert (first % 2 == 0).all() and (second == first + 1).all() and len(batch["index"]) == 6
    torch.testing.assert_close(cached.outputs(batch)["logits"], live.outputs(batch)["logits"], rtol=1e-5, atol=1e-6)
    # the training data changes: the cache is refused, the difference named
    other = load_recipe({**data, "data": {**data["data"], "train_subset": 5}})
    with pytest.raises(DistillError, match="data"):
        open_cache(other, task, teacher, task.prepare(other, None), path)
    # a run that builds and reads its cache (fp32): the live run's student, to rounding (agreement is
    # continuous; Spearman over these few test pairs moves in steps of 0.1 on a single swap)
    data["teacher"].update(cache="auto", cache_dtype="fp32")
    (tiny_setup / "cached.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tiny_setup / "cached.yaml"), "--out", str(tiny_setup / "cached"), "--quiet"]) == 0
    with_cache = json.loads((tiny_setup / "cached" / "results.json").read_text())
    without = json.loads((tiny_setup / "live" / "results.json").read_text())
    assert with_cache["student"]["agreement"] == pytest.approx(without["student"]["agreement"], abs=1e-4)
    assert with_cache["baseline"]["spearman"] == without["baseline"]["spearman"]
    assert (tiny_setup / "cached" / "teacher-cache" / "header.json").is_file()


@pytest.mark.parametrize("student", [{"model": "hf", "kwargs": {"layers": [1]}},
                                     {"model": "static-embedding", "kwargs": {"init": "teacher"}}])
def test_sentence_students_export_with_parity(tiny_setup, student):
    """`distill export` of a sentence-embedding run (issue 14): ONNX, TorchScript and safetensors, the
    parity check on tokenised test sentences (before: float random ids crashed the embedding; ONNX
    refused the static student's isin and EmbeddingBag)."""
    from distill.export import export_source, load_exported
    from distill.finished_run import FinishedRun

    run_task(tiny_setup, student, "exp")
    run = FinishedRun(tiny_setup / "exp")
    inputs = run.example_inputs(5)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].dtype == torch.long
    expected = run.student()(**inputs)
    for fmt in ("onnx", "torchscript", "safetensors"):
        result = export_source(run, fmt)
        assert result.parity.passed and result.parity.samples == 2 * len(PAIRS[2:])  # every test sentence
        runner = load_exported(fmt, result.path.read_bytes(), run.fresh_student)
        torch.testing.assert_close(runner(inputs), expected, rtol=1e-4, atol=1e-5)
