"""Token losses from the output head (``distill.losses.fused_head``): the same values and gradients
(hidden states, head weight, head bias) as the token losses on ``F.linear(hidden, weight, bias)``,
with masks, temperatures, padded heads, top-k and dense teachers, bf16 inputs and empty masks; and
no ``[tokens, vocab]`` tensor is ever created (measured by the bytes ATen operators allocate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.losses import TopK, fused_head, get_loss
from distill.losses.fused_head import (
    Head,
    fused_token_ce,
    fused_token_fkl,
    fused_token_gjsd,
    fused_token_rkl,
    fused_token_skl,
    fused_token_srkl,
    fused_token_tvd,
)
from distill.profile import _LiveTensorBytes

torch.set_num_threads(1)
# float() of a loss value in asserts
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

FUSED = {"token_fkl": fused_token_fkl, "token_rkl": fused_token_rkl, "token_gjsd": fused_token_gjsd,
         "token_tvd": fused_token_tvd, "token_skl": fused_token_skl, "token_srkl": fused_token_srkl}
NAMES = list(FUSED)
B, T, H_S, H_T, V, PAD_S, PAD_T = 2, 7, 12, 20, 40, 48, 64  # heads padded beyond the 40 real tokens


def _params(name: str) -> dict:
    return {"token_gjsd": {"beta": 0.3}, "token_skl": {"alpha": 0.2}, "token_srkl": {"alpha": 0.2}}.get(name, {})


def _heads(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = True):
    """A student head (hidden ``[B, T, H_S]``, weight ``[PAD_S, H_S]``, bias) that requires grad, and a
    teacher head (``[B, T, H_T]``, ``[PAD_T, H_T]``, bias) that does not."""
    g = torch.Generator().manual_seed(seed)
    student = Head(torch.randn(B, T, H_S, generator=g), torch.randn(PAD_S, H_S, generator=g) * 0.6,
                   torch.randn(PAD_S, generator=g) if bias else None)
    teacher = Head(torch.randn(B, T, H_T, generator=g), torch.randn(PAD_T, H_T, generator=g) * 0.5,
                   torch.randn(PAD_T, generator=g) if bias else None)
    student = Head(*(None if t is None else t.to(dtype).requires_grad_() for t in student))
    return student, Head(*(None if t is None else t.to(dtype) for t in teacher))


def _copy(head: Head, dtype: torch.dtype | None = None) -> Head:
    """Fresh leaves with the same values (cast to ``dtype``), for the reference path."""
    return Head(*(None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
                  for t in head))


def _logits(head: Head) -> torch.Tensor:
    return F.linear(head.hidden, head.weight, head.bias)


def _mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)


def _grads(head: Head) -> list[torch.Tensor]:
    return [t.grad for t in head if t is not None and t.requires_grad]


def _assert_same(fused: Head, reference: Head, rtol: float = 1e-5) -> None:
    for got, want in zip(_grads(fused), _grads(reference)):
        assert got is not None and got.shape == want.shape and got.dtype == want.dtype
        # within rtol of the gradient's own scale (elements near zero compare absolutely against it)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ------------------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_loss_equals_the_logits_path_in_value_and_every_gradient(name, temperature):
    student, teacher = _heads(seed=1)
    ref = _copy(student)
    kwargs = dict(temperature=temperature, vocab_size=V, **_params(name))
    value = FUSED[name](student, teacher, _mask(), chunk_tokens=3, **kwargs)
    value.backward()
    expected = get_loss(name).fn(_logits(ref), _logits(teacher), _mask(), chunk_tokens=3, **kwargs)
    expected.backward()
    assert value.dtype == torch.float32 and value.shape == ()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert float(value) > 1e-3  # the heads differ: a loss that ignored its inputs would fail above
    _assert_same(student, ref)
    # head rows beyond the compared vocabulary, and masked positions, get exactly zero
    assert float(student.weight.grad[V:].abs().sum()) == 0 and float(student.bias.grad[V:].abs().sum()) == 0
    assert float(student.hidden.grad[~_mask()].abs().sum()) == 0
    assert float(student.hidden.grad[_mask()].abs().sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_pieces_smaller_than_the_chunk_give_the_same_values_and_gradients(name, monkeypatch):
    # the row loss runs on pieces of PIECE_LOGITS logits: here 2 rows, in chunks of 5 (2 + 2 + 1)
    monkeypatch.setattr(fused_head, "PIECE_LOGITS", 2 * V)
    student, teacher = _heads(seed=10)
    ref = _copy(student)
    value = FUSED[name](student, teacher, _mask(), temperature=2.0, chunk_tokens=5, vocab_size=V, **_params(name))
    value.backward()
    expected = get_loss(name).fn(_logits(ref), _logits(teacher), _mask(), temperature=2.0, vocab_size=V,
                                 **_params(name))
    expected.backward()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    _assert_same(student, ref)
    with torch.no_grad():
        assert float(FUSED[name](student, teacher, _mask(), temperature=2.0, chunk_tokens=5, vocab_size=V,
                                 **_params(name))) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_without_bias_and_in_one_chunk_it_is_the_same(name):
    student, teacher = _heads(seed=2, bias=False)
    ref = _copy(student)
    value = FUSED[name](student, teacher, None, chunk_tokens=10_000, vocab_size=V, **_params(name))
    value.backward()
    get_loss(name).fn(_logits(ref), _logits(teacher), None, vocab_size=V, **_params(name)).backward()
    assert float(value) == pytest.approx(float(get_loss(name).fn(_logits(ref), _logits(teacher), None, vocab_size=V,
                                                                  **_params(name))), rel=1e-5)
    _assert_same(student, ref)


@pytest.mark.parametrize("name", ["token_fkl", "token_gjsd", "token_srkl"])
def test_a_topk_teacher_and_dense_teacher_logits_work_as_on_the_logits_path(name):
    student, teacher = _heads(seed=3)
    t_logits = _logits(teacher)[..., :V]
    log_p = torch.log_softmax(t_logits, -1)
    values, index = log_p.topk(5, -1)
    tail = 1 - values.exp().sum(-1)
    for teacher_arg, extra in ((TopK(values, index, tail), {}), (t_logits, {"topk": 6}), (teacher, {"topk": 6})):
        fused, ref = _copy(student), _copy(student)
        value = FUSED[name](fused, teacher_arg, _mask(), chunk_tokens=4, vocab_size=V, **extra, **_params(name))
        value.backward()
        ref_teacher = t_logits if isinstance(teacher_arg, Head) else teacher_arg
        expected = get_loss(name).fn(_logits(ref), ref_teacher, _mask(), chunk_tokens=4, vocab_size=V, **extra,
                                     **_params(name))
        expected.backward()
        assert float(value) == pytest.approx(float(expected), rel=1e-5), type(teacher_arg).__name__
        _assert_same(fused, ref)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_the_fp32_loss_of_the_rounded_inputs(name):
    student, teacher = _heads(seed=4, dtype=torch.bfloat16)
    ref, ref_teacher = _copy(student, torch.float32), _copy(teacher, torch.float32)
    value = FUSED[name](student, teacher, _mask(), temperature=1.5, chunk_tokens=5, vocab_size=V, **_params(name))
    value.backward()
    expected = get_loss(name).fn(_logits(ref), _logits(ref_teacher), _mask(), temperature=1.5, vocab_size=V,
                                 **_params(name))
    expected.backward()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    for got, want in zip(_grads(student), _grads(ref)):
        assert got.dtype == torch.bfloat16
        # the fp32 gradient, rounded once to bf16 (8 bits of mantissa)
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    # the logits path on the bf16 logits themselves is further off: the fused one is not just that
    rounded = get_loss(name).fn(_logits(_copy(student)), _logits(teacher), _mask(), temperature=1.5, vocab_size=V,
                                **_params(name))
    assert abs(float(rounded) - float(expected)) > abs(float(value) - float(expected))


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_mask_gives_zero_and_zero_gradients(name):
    student, teacher = _heads(seed=5)
    value = FUSED[name](student, teacher, torch.zeros(B, T), vocab_size=V, **_params(name))
    value.backward()
    assert float(value) == 0.0 and value.dtype == torch.float32
    assert all(float(g.abs().sum()) == 0 for g in _grads(student))


def test_a_weighted_loss_scales_the_gradients_and_the_teacher_gets_none():
    student, teacher = _heads(seed=6)
    teacher = Head(teacher.hidden.requires_grad_(), teacher.weight, teacher.bias)
    half, ref = _copy(student), _copy(student)
    (0.5 * fused_token_gjsd(half, teacher, _mask(), vocab_size=V)).backward()
    fused_token_gjsd(ref, teacher, _mask(), vocab_size=V).backward()
    for got, want in zip(_grads(half), _grads(ref)):
        torch.testing.assert_close(got, 0.5 * want)
    assert teacher.hidden.grad is None


def test_without_gradients_no_graph_is_built_and_a_frozen_head_gets_none():
    student, teacher = _heads(seed=7)
    with torch.no_grad():
        value = fused_token_fkl(student, teacher, vocab_size=V)
    assert not value.requires_grad
    frozen = Head(student.hidden.detach().requires_grad_(), student.weight.detach(), student.bias.detach())
    again = fused_token_fkl(frozen, teacher, vocab_size=V)
    again.backward()
    assert float(again) == pytest.approx(float(value), rel=1e-6)
    assert frozen.hidden.grad is not None and frozen.weight.grad is None


def test_fused_token_ce_equals_token_ce():
    student, _ = _heads(seed=8)
    ref = _copy(student)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    labels[0, 2] = -100
    value = fused_token_ce(student, labels, _mask(), chunk_tokens=3, vocab_size=V)
    value.backward()
    expected = get_loss("token_ce").fn(_logits(ref), labels, _mask(), vocab_size=V)
    expected.backward()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    _assert_same(student, ref)
    with pytest.raises(ValueError, match=f"label {V} is outside"):
        fused_token_ce(student, torch.full((B, T), V), None, vocab_size=V)


# ------------------------------------------------------------------------------ memory
class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an ATen operator returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _step_memory(fused: bool, tokens: int, chunk: int, vocab: int = 1024, hidden: int = 16) -> tuple[int, int]:
    """Peak live bytes and largest tensor (elements) of one step, forward and backward, heads included."""
    g = torch.Generator().manual_seed(0)
    student = Head(torch.randn(1, tokens, hidden, generator=g).requires_grad_(),
                   (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_())
    teacher = Head(torch.randn(1, tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.3)
    live, largest = _LiveTensorBytes(), _LargestTensor()
    with live.mode, largest:
        if fused:
            loss = fused_token_gjsd(student, teacher, chunk_tokens=chunk)
        else:
            with torch.no_grad():
                t_logits = _logits(teacher)
            loss = get_loss("token_gjsd").fn(_logits(student), t_logits, chunk_tokens=chunk)
        loss.backward()
    return live.peak, largest.largest


def test_no_tokens_by_vocab_tensor_exists_and_the_peak_is_a_fraction_of_the_logits_path(monkeypatch):
    tokens, chunk, piece, vocab = 256, 16, 4, 1024
    monkeypatch.setattr(fused_head, "PIECE_LOGITS", piece * vocab)
    logits_bytes, row_bytes = tokens * vocab * 4, vocab * 4
    fused_peak, fused_largest = _step_memory(True, tokens, chunk)
    today_peak, today_largest = _step_memory(False, tokens, chunk)
    assert today_largest >= tokens * vocab  # the logits path builds [tokens, vocab]...
    # ...the fused one a chunk of it at most (or the head weight's gradient, [vocab, hidden])
    assert fused_largest <= max(chunk, 16) * vocab < tokens * vocab
    assert today_peak > 2 * logits_bytes  # both models' logits, and the student's gradient
    assert fused_peak < 0.25 * today_peak
    # what the fused step holds grows with neither the tokens (the hidden states aside)...
    longer_peak, _ = _step_memory(True, 4 * tokens, chunk)
    assert longer_peak - fused_peak < 0.1 * logits_bytes  # the logits path's would grow by 3 x 3.4
    # ...nor, beyond the two models' logits of a chunk, with the chunk: the row loss's ~12 fp32
    # temporaries are the size of a piece (as the module's docstring says)
    bigger_chunk, _ = _step_memory(True, tokens, 4 * chunk)
    assert 1.5 * 3 * chunk * row_bytes < bigger_chunk - fused_peak < 3 * 3 * chunk * row_bytes
    monkeypatch.setattr(fused_head, "PIECE_LOGITS", 4 * piece * vocab)
    bigger_piece, _ = _step_memory(True, tokens, 4 * chunk)
    assert 8 * 3 * piece * row_bytes < bigger_piece - bigger_chunk < 16 * 3 * piece * row_bytes


# ------------------------------------------------------------------------------ errors
def test_bad_arguments_say_what_is_wrong():
    student, teacher = _heads(seed=9)
    with pytest.raises(TypeError, match="student must be a Head"):
        fused_token_fkl(_logits(student), teacher, vocab_size=V)
    with pytest.raises(ValueError, match=r"head weight \[V, H\]"):
        fused_token_fkl(Head(student.hidden, student.weight.T), teacher, vocab_size=V)
    with pytest.raises(ValueError, match=r"head bias must be \[48\]"):
        fused_token_fkl(Head(student.hidden, student.weight, student.bias[:3]), teacher, vocab_size=V)
    with pytest.raises(ValueError, match="differ in their positions"):
        fused_token_fkl(student, Head(teacher.hidden[:, :3], teacher.weight), vocab_size=V)
    with pytest.raises(ValueError, match="not one vocabulary padded"):
        fused_token_fkl(student, Head(teacher.hidden, teacher.weight[:30]))
    with pytest.raises(TypeError, match="teacher must be a Head"):
        fused_token_fkl(student, "teacher", vocab_size=V)
    with pytest.raises(ValueError, match="beta must be in"):
        fused_token_gjsd(student, teacher, beta=2.0, vocab_size=V)


# ------------------------------------------------------------------------------ in a recipe
SHAKESPEARE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 3


def _lm_recipe(path, *, fused: bool, student: dict, terms: list[dict], cache=None) -> dict:
    fast = {"epochs": 1, "batch_size": 4, "optimizer": "adam", "lr": 0.003}
    return {
        "name": "lm", "task": "causal-lm", "seeds": [0], "threads": 1,
        "data": {"name": "text", "options": {"path": str(path), "block_size": 16}},
        "teacher": {"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "train": fast,
                    "gate": {"enabled": False}, **({"cache": cache, "cache_topk": 8} if cache else {})},
        "student": student, "train": fast, "task_options": {"fused_head": fused},
        "baseline": {"terms": [{"name": "ce", "loss": "token_ce"}]},
        "distill": {"terms": terms}, "evaluate": {"latency": False},
    }


@pytest.mark.parametrize("student, terms, cache", [
    ({"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
     [{"name": "ce", "loss": "token_ce", "weight": 0.5}, {"name": "kd", "loss": "token_gjsd", "weight": 0.5}], None),
    ({"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
     [{"name": "kd", "loss": "token_fkl"}], "auto"),
    ({"model": "hf", "kwargs": {"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                           "n_positions": 16}}},
     [{"name": "kd", "loss": "token_fkl"}], None),
], ids=["gpt-live-ce-gjsd", "gpt-cached-topk", "hf-gpt2-live"])
def test_fused_head_in_a_recipe_trains_the_same_students_without_building_the_logits(tmp_path, student, terms, cache):
    """`task_options.fused_head` (issue 16): training stages feed the models up to their output layers
    and every token term runs its fused form; the students equal those of the plain run (to fp32
    rounding), and no output layer builds [B, T, V] logits while a model trains or teaches."""
    from distill.pipeline import run_recipe
    from distill.recipes import load_recipe

    path = tmp_path / "input.txt"
    path.write_text(SHAKESPEARE)
    built: list[tuple[bool, int]] = []
    original = torch.nn.Linear.__call__

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-1] == len(set(SHAKESPEARE)):  # logits
            built.append((torch.is_grad_enabled(), out.shape[-1]))
        return out

    results, untrained = {}, {}
    for fused in (False, True):
        built.clear()
        torch.nn.Linear.__call__ = spy
        try:
            results[fused] = run_recipe(load_recipe(_lm_recipe(path, fused=fused, student=student, terms=terms,
                                                               cache=cache)),
                                        tmp_path / f"fused-{fused}", progress=False)
        finally:
            torch.nn.Linear.__call__ = original
        trained_with_logits = [b for b in built if b[0]]  # logits built with gradients on: a training step
        untrained[fused] = len(built) - len(trained_with_logits)  # evaluation, and a live teacher's steps
        if fused:
            assert not trained_with_logits
        else:
            assert trained_with_logits
    if cache is None:  # the live teacher gave its head, not its logits, at every training step
        assert untrained[True] < untrained[False]
    for role in ("baseline", "student"):
        plain, fused_ = getattr(results[False], role), getattr(results[True], role)
        assert fused_.metric("perplexity") == pytest.approx(plain.metric("perplexity"), rel=1e-4)


def test_a_term_that_needs_logits_is_refused_with_fused_heads(tmp_path):
    from distill import DistillError
    from distill.pipeline import run_recipe
    from distill.recipes import load_recipe

    path = tmp_path / "input.txt"
    path.write_text(SHAKESPEARE)
    data = _lm_recipe(path, fused=True, student={"model": "gpt", "kwargs": {"n_layer": 1, "n_head": 2, "n_embd": 8}},
                      terms=[{"name": "kd", "loss": "kd"}])
    with pytest.raises(DistillError, match=r"term 'kd' \(kd\) reads logits, but the models give their output heads"):
        run_recipe(load_recipe(data), tmp_path / "run", progress=False)
    sharded = {**data, "distill": {"terms": [{"name": "kd", "loss": "token_fkl"}]}, "train": {**data["train"], "sharding": "fsdp"}}
    with pytest.raises(DistillError, match="use one of fused_head and train.sharding: fsdp"):
        load_recipe(sharded)
