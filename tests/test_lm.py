"""Causal language modelling: the GPT zoo model, Tiny Shakespeare blocks, sampling, GKD's
on-policy batches, sequence-level KD, a cached top-k teacher, and a short distillation run."""

from __future__ import annotations

import sys

import pytest
import torch

from distill.cache import TeacherCache, build_cache
from distill.data import BatchLoader, load_dataset
from distill.data.tinyshakespeare import (
    TINY_SHAKESPEARE_SHA256,
    char_vocab,
    decode_chars,
    encode_chars,
    gpt2_tokenizer,
)
from distill.data.types import ArrayDataset
from distill.errors import DistillError
from distill.losses import TopK, get_loss
from distill.models import create_model, load_weights, save_weights
from distill.objective import Distiller, Term
from distill.tasks.causal_lm import (
    OnPolicyTransform,
    evaluate_lm,
    generate,
    sample_teacher_nll,
    sequence_kd_dataset,
)
from distill.trainer import TrainConfig, Trainer

torch.set_num_threads(1)


def tiny_gpt(vocab=13, block=16, seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(n_layer=2, n_head=2, n_embd=16)
    options.update(kw)
    return create_model("gpt", vocab, (block,), **options).eval()


def ids(b, t, vocab=13, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the model
def test_gpt_maps_token_ids_to_next_token_logits():
    model = tiny_gpt(vocab_size=16)  # 13 real tokens padded to 16
    x = ids(3, 10)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 10, 16)
        assert torch.isfinite(logits).all()
        assert torch.equal(model(x.float()), logits)  # the batch loader hands ids over as float32
    assert model.feature_taps == ["blocks.0", "blocks.1", "ln_f"]
    assert model.head.weight is model.tok_emb.weight  # tied, as in GPT-2
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(ids(1, 17))


def test_gpt_is_causal():
    model = tiny_gpt()
    x = ids(2, 12, seed=1)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 13
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_gpt_options_are_checked_and_weights_round_trip(tmp_path):
    with pytest.raises(DistillError, match="divisible by n_head"):
        create_model("gpt", 13, (16,), n_embd=10, n_head=4)
    with pytest.raises(DistillError, match="smaller than the data's 13 tokens"):
        create_model("gpt", 13, (16,), vocab_size=8)
    with pytest.raises(DistillError, match=r"input_shape \(T,\)"):
        create_model("gpt", 13, (1, 16))
    with pytest.raises(DistillError, match="does not take option 'n_layers'"):
        create_model("gpt", 13, (16,), n_layers=2)
    model = tiny_gpt()
    path = save_weights(model, tmp_path / "gpt.safetensors")
    fresh = load_weights(tiny_gpt(seed=1), path)
    x = ids(2, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------------------ Tiny Shakespeare
def test_tinyshakespeare_gives_verified_next_token_blocks(shared):
    data = load_dataset("tinyshakespeare", path=shared / "tinyshakespeare", block_size=32)
    vocab = data.extra["vocab"]
    assert data.num_classes == len(vocab) == 65 and data.input_shape == (32,)
    x, y = data.train.inputs, data.train.targets
    assert x.dtype == y.dtype == torch.int64 and x.shape[1] == 32
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # contiguous, stride 32
    assert decode_chars(x[0], vocab).startswith("First Citizen:")
    total = (len(x) + len(data.test.inputs)) * 32
    assert 0.85 < len(x) * 32 / total < 0.95  # the first 90 % trains
    overlap = load_dataset("tinyshakespeare", path=shared / "tinyshakespeare" / "input.txt", block_size=32, stride=16)
    assert len(overlap.train) == pytest.approx(2 * len(x), abs=2)


def test_tinyshakespeare_downloads_and_refuses_another_file(shared, tmp_path):
    mirror = (shared / "tinyshakespeare").as_uri() + "/"
    data = load_dataset("tinyshakespeare", data_dir=tmp_path, mirror=mirror, block_size=64)
    assert (tmp_path / "tinyshakespeare" / "input.txt").is_file() and len(data.train) == 15685
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("To be, or not to be\n")
    with pytest.raises(DistillError, match=TINY_SHAKESPEARE_SHA256):
        load_dataset("tinyshakespeare", path=wrong)
    with pytest.raises(DistillError, match="unknown tokenizer 'bpe'"):
        load_dataset("tinyshakespeare", path=shared / "tinyshakespeare", tokenizer="bpe")
    with pytest.raises(DistillError, match="needs tokenizer_path"):
        load_dataset("tinyshakespeare", path=shared / "tinyshakespeare", tokenizer="gpt2")


def test_character_codec_round_trips():
    vocab = char_vocab("hello world")
    assert vocab == " dehlorw"
    assert decode_chars(encode_chars("low hero", vocab), vocab) == "low hero"
    with pytest.raises(DistillError, match="'z' is not in the vocabulary"):
        encode_chars("zoo", vocab)


def test_gpt2_tokenizer_is_optional(shared, monkeypatch):
    pytest.importorskip("tokenizers")
    bpe = gpt2_tokenizer(shared / "gpt2-tokenizer")
    assert bpe.get_vocab_size() == 50257
    assert bpe.encode("First Citizen:").ids == [5962, 22307, 25]
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the nlp extra were not installed
    with pytest.raises(DistillError, match=r"distill\[nlp\]"):
        gpt2_tokenizer(shared / "gpt2-tokenizer")


# ------------------------------------------------------------------------------ sampling
def test_generate_is_seeded_greedy_at_zero_and_crops_to_the_block():
    model = tiny_gpt(block=8)
    prompt = ids(3, 4)
    first = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    again = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert first.shape == (3, 14) and torch.equal(first[:, :4], prompt) and torch.equal(first, again)
    greedy = generate(model, prompt, 3, temperature=0)
    with torch.no_grad():
        assert torch.equal(greedy[:, 4], model(prompt)[:, -1].argmax(-1))
    padded = tiny_gpt(vocab_size=16)
    with torch.no_grad():
        padded.head.weight[13:] = 10.0  # padded tokens that would win if they could be sampled
    assert int(generate(padded, prompt, 20, generator=torch.Generator().manual_seed(0), vocab_size=13).max()) < 13


def test_cached_decoding_gives_the_logits_and_samples_of_full_recomputation():
    model = tiny_gpt(block=12)
    x = ids(3, 12, seed=4)
    cache: list = []
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :5], cache=cache)[:, -1]] + [model(x[:, t:t + 1], cache=cache)[:, -1] for t in range(5, 12)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=0, atol=1e-5)
    prompt = ids(3, 4, seed=5)
    fast = generate(model, prompt, 8, generator=torch.Generator().manual_seed(2))
    slow_model = tiny_gpt(block=12)
    slow_model.supports_cache = False
    slow = generate(slow_model, prompt, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast, slow)
    longer = generate(model, prompt, 12, generator=torch.Generator().manual_seed(2))  # past the block: recompute
    assert longer.shape == (3, 16) and torch.equal(longer[:, :12], fast[:, :12])


def test_on_policy_transform_replaces_a_lambda_fraction_of_batches_with_student_samples():
    student = tiny_gpt()
    transform = OnPolicyTransform(student, lam=0.5, max_new_tokens=6)
    batch = {"input": ids(4, 16).float(), "target": ids(4, 16, seed=1), "index": torch.arange(4)}
    decisions = []
    for step in range(40):
        out = transform(batch, torch.Generator().manual_seed(step))
        decisions.append(transform.last_on_policy)
        if not transform.last_on_policy:
            assert out is batch
            continue
        assert set(out) == {"input", "mask"} and out["input"].shape == (4, 16)
        assert torch.equal(out["input"][:, :10], batch["input"][:, :10])  # the prompt is kept
        gen = torch.Generator().manual_seed(step)
        torch.rand((), generator=gen)  # the transform's coin
        expected = generate(student, batch["input"][:, :10].long(), 6, 1.0, gen)
        assert torch.equal(out["input"].long(), expected)  # the student's own samples
        assert out["mask"].sum(1).tolist() == [6] * 4 and out["mask"][:, 9:15].all()
    expected_coins = [bool(torch.rand((), generator=torch.Generator().manual_seed(s)) < 0.5) for s in range(40)]
    assert decisions == expected_coins
    assert transform.on_policy_batches == sum(decisions) and 10 <= sum(decisions) <= 30
    never, always = OnPolicyTransform(student, lam=0.0), OnPolicyTransform(student, lam=1.0, max_new_tokens=4)
    for step in range(5):
        never(batch, torch.Generator().manual_seed(step))
        always(batch, torch.Generator().manual_seed(step))
    assert never.on_policy_batches == 0 and always.on_policy_batches == 5
    with pytest.raises(DistillError, match="leave no prompt"):
        OnPolicyTransform(student, lam=1.0, max_new_tokens=16)(batch, torch.Generator())


def test_sequence_kd_dataset_holds_the_teachers_continuations():
    teacher = tiny_gpt(seed=3)
    prompts = ids(5, 4, seed=2)
    data = sequence_kd_dataset(teacher, prompts, max_new_tokens=8, temperature=0, batch_size=2)
    assert isinstance(data, ArrayDataset) and data.inputs.shape == data.targets.shape == (5, 11)
    full = generate(teacher, prompts, 8, temperature=0)
    assert torch.equal(data.inputs, full[:, :-1]) and torch.equal(data.targets, full[:, 1:])
    sampled = sequence_kd_dataset(teacher, prompts, 8, temperature=1.0, seed=1)
    assert torch.equal(sampled.inputs, sequence_kd_dataset(teacher, prompts, 8, temperature=1.0, seed=1).inputs)


def test_sample_teacher_nll_scores_the_models_own_continuations():
    teacher, student = tiny_gpt(seed=8), tiny_gpt(seed=9)
    prompts = ids(6, 4, seed=7)
    value = sample_teacher_nll(student, teacher, prompts, 6, seed=3)
    assert value == sample_teacher_nll(student, teacher, prompts, 6, seed=3)  # seeded
    sequence = generate(student, prompts, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(sequence[:, :-1]), -1)[:, 3:]
    expected = float(-log_t.gather(-1, sequence[:, 4:].unsqueeze(-1)).mean())
    assert value == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ teacher cache and training
def test_a_topk_teacher_cache_feeds_the_tail_mass_to_token_fkl(tmp_path):
    teacher, student = tiny_gpt(seed=4), tiny_gpt(seed=5)
    data = ArrayDataset(ids(12, 16, seed=3), ids(12, 16, seed=4))
    loader = BatchLoader(data, 4, shuffle=False)
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "cache", topk=4, dtype="fp32"))
    batch = next(iter(loader))
    cached = Distiller(student, cache, [Term("kd", "token_fkl", params={"topk": 4})])(batch).terms["kd"]
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(batch["input"]), -1)
        top, index = log_p.topk(4, -1)
        tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
        explicit = get_loss("token_fkl").fn(student(batch["input"]), TopK(top, index, tail))
    assert float(cached.detach()) == pytest.approx(float(explicit), rel=1e-4)


def test_distilling_a_gpt_lowers_the_loss_and_brings_the_student_to_the_teacher():
    teacher = tiny_gpt(seed=6, n_embd=32)
    with torch.no_grad():  # a peaked teacher, so that there is something to learn
        teacher.head.weight.mul_(20)
    student = tiny_gpt(seed=7).train()
    data = ArrayDataset(ids(64, 16, seed=5), ids(64, 16, seed=6))
    loader = BatchLoader(data, 16, shuffle=True)
    evaluation = list(BatchLoader(data, 32, shuffle=False))
    before = evaluate_lm(student, evaluation, teacher)
    distiller = Distiller(student, teacher, [Term("kd", "token_gjsd", params={"beta": 0.5, "chunk_tokens": 50})])
    transform = OnPolicyTransform(student, lam=0.5, max_new_tokens=4)
    config = TrainConfig(epochs=4, lr=1e-2, progress=False, tensorboard=False, schedule="constant")
    history = Trainer(distiller, loader, config, batch_transform=transform).fit()
    after = evaluate_lm(student, evaluation, teacher)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["kl_to_teacher"] < before["kl_to_teacher"] and after["agreement"] > before["agreement"]
    assert 0 < transform.on_policy_batches < transform.batches


def test_token_ids_stay_integers_so_a_bf16_teacher_sees_them_exactly():
    from distill.data import BatchLoader
    from distill.data.types import ArrayDataset
    from distill.signals import move_batch

    ids = torch.arange(50_000, 50_000 + 8 * 16, dtype=torch.int64).reshape(8, 16)  # GPT-2-sized ids
    loader = BatchLoader(ArrayDataset(ids, torch.zeros(8, dtype=torch.int64)), 4, shuffle=False)
    batch = next(iter(loader))
    assert batch["input"].dtype == torch.int64 and torch.equal(batch["input"], ids[:4])
    fed = move_batch(batch, "cpu", torch.bfloat16)  # what LiveTeacher(precision="bf16") does
    assert torch.equal(fed["input"], ids[:4])  # bf16 would have rounded 50,001 to 50,048
    with pytest.raises(DistillError, match="token ids"):
        BatchLoader(ArrayDataset(ids, torch.zeros(8, dtype=torch.int64)), 4, shuffle=False, mean=(0.5,), std=(1.0,))


def test_generate_reuses_hugging_face_keys_and_values():
    pytest.importorskip("transformers")
    from distill.nlp import from_config
    from distill.tasks import causal_lm

    torch.manual_seed(0)
    model = from_config({"model_type": "gpt2", "vocab_size": 40, "n_positions": 64, "n_embd": 32, "n_layer": 2,
                         "n_head": 2}, task="causal-lm")
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    prompt = torch.randint(0, 40, (3, 5))
    cached = causal_lm.generate(model, prompt, 6, temperature=0)
    assert lengths == [5, 1, 1, 1, 1, 1]  # the prompt once, then one new position per step
    lengths.clear()
    full = causal_lm.generate(without_cache_support(model), prompt, 6, temperature=0)  # no cache: whole context
    assert torch.equal(cached, full) and cached.shape == (3, 11)


def without_cache_support(model):
    """``model`` behind a plain module (no ``config``), so ``generate`` reruns the context."""

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(input_ids=ids).logits

    return Plain()
