"""Token-level divergences for causal LMs: each against a float64 loop written here, masking,
chunking, padded vocabularies, GKD's β limits, top-k teachers with a tail mass, bounded memory,
and the objective's "mask" input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.errors import DistillError
from distill.losses import TopK, get_loss
from distill.losses.token_divergences import common_vocab
from distill.objective import Distiller, Term, token_mask

torch.set_num_threads(1)
# float() of a loss value in asserts
pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"), pytest.mark.fast]

KL_FAMILY = ["token_fkl", "token_rkl", "token_gjsd", "token_skl", "token_srkl"]
ALL = KL_FAMILY + ["token_tvd"]


# ------------------------------------------------------------------------------ the reference
def _softmax64(row: torch.Tensor, temperature: float) -> torch.Tensor:
    z = row.double() / temperature
    e = torch.exp(z - z.max())
    return e / e.sum()


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for pi, qi in zip(p, q):
        if pi > 0:
            total = total + pi * torch.log(pi / qi)
    return total


def reference(name, student, teacher, mask=None, temperature=1.0, beta=0.5, alpha=0.1):
    """The loss by its definition, one token at a time, in float64 (differentiable)."""
    b, t, _ = student.shape
    values = []
    for i in range(b):
        for j in range(t):
            if mask is not None and not mask[i, j]:
                continue
            ps, pt = _softmax64(student[i, j], temperature), _softmax64(teacher[i, j], temperature)
            if name == "token_fkl":
                v = _kl64(pt, ps)
            elif name == "token_rkl":
                v = _kl64(ps, pt)
            elif name == "token_gjsd":
                m = beta * pt + (1 - beta) * ps
                v = beta * _kl64(pt, m) + (1 - beta) * _kl64(ps, m)
            elif name == "token_skl":
                v = _kl64(pt, alpha * pt + (1 - alpha) * ps)
            elif name == "token_srkl":
                v = _kl64(ps, (1 - alpha) * pt + alpha * ps)
            elif name == "token_tvd":
                v = 0.5 * (pt - ps).abs().sum()
            else:
                raise AssertionError(name)
            values.append(v * (temperature**2 if name in KL_FAMILY else 1.0))
    if not values:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(values).mean()


def _params(name: str, **extra) -> dict:
    params = dict(extra)
    if name == "token_gjsd":
        params.setdefault("beta", 0.5)
    if name in ("token_skl", "token_srkl"):
        params.setdefault("alpha", 0.1)
    return params


def _logits(*shape, seed=0, scale=2.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()


def _ref_kwargs(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in ("temperature", "beta", "alpha")}


# ------------------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_loss_matches_its_definition_in_value_and_gradient(name, temperature):
    student, teacher = _logits(2, 5, 7, seed=1), _logits(2, 5, 7, seed=2).detach()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    params = _params(name, temperature=temperature, chunk_tokens=3)
    value = get_loss(name).fn(student, teacher, mask, **params)
    value.backward()
    s64 = student.detach().double().requires_grad_()
    expected = reference(name, s64, teacher.double(), mask, **_ref_kwargs(params))
    expected.backward()
    assert value.dtype == torch.float32 and value.shape == ()
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_gjsd_matches_its_definition_at_other_betas(beta):
    student, teacher = _logits(1, 4, 6, seed=3), _logits(1, 4, 6, seed=4).detach()
    value = get_loss("token_gjsd").fn(student, teacher, None, beta=beta)
    expected = reference("token_gjsd", student.detach(), teacher, beta=beta)
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["token_skl", "token_srkl"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_skew_losses_match_their_definition_at_other_alphas(name, alpha):
    student, teacher = _logits(1, 4, 6, seed=5), _logits(1, 4, 6, seed=6).detach()
    value = get_loss(name).fn(student, teacher, None, alpha=alpha)
    expected = reference(name, student.detach(), teacher, alpha=alpha)
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-7)


def test_a_teacher_that_requires_grad_gets_its_gradient_too():
    """Mutual learning passes a second student as the teacher: both sides get gradients."""
    student, teacher = _logits(2, 3, 5, seed=7), _logits(2, 3, 5, seed=8)
    get_loss("token_gjsd").fn(student, teacher, None, chunk_tokens=2).backward()
    s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))
    reference("token_gjsd", s64, t64).backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(teacher.grad.double(), t64.grad, rtol=1e-4, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(ALL),
    b=st.integers(1, 3), t=st.integers(1, 5), v=st.integers(2, 9),
    seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0),
)
def test_losses_are_zero_at_the_teacher_and_positive_elsewhere(name, b, t, v, seed, temperature):
    teacher = _logits(b, t, v, seed=seed).detach()
    same = get_loss(name).fn(teacher.clone(), teacher, None, **_params(name, temperature=temperature))
    assert abs(float(same)) < 1e-5
    other = _logits(b, t, v, seed=seed + 1).detach()
    assert float(get_loss(name).fn(other, teacher, None, **_params(name, temperature=temperature))) >= -1e-6


def test_the_gradient_reaches_a_student_model_through_the_loss():
    head = nn.Linear(4, 9)
    x = torch.randn(2, 6, 4)
    teacher = torch.randn(2, 6, 9)
    get_loss("token_rkl").fn(head(x), teacher, None, chunk_tokens=5).backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_without_gradients_no_graph_is_built():
    student, teacher = _logits(2, 3, 5), _logits(2, 3, 5, seed=1).detach()
    with torch.no_grad():
        value = get_loss("token_fkl").fn(student, teacher)
    assert not value.requires_grad
    torch.testing.assert_close(value, get_loss("token_fkl").fn(student.detach(), teacher))


# ------------------------------------------------------------------------------ masking and chunking
@pytest.mark.parametrize("name", ALL)
def test_padded_positions_change_nothing(name):
    student, teacher = _logits(2, 6, 8, seed=9), _logits(2, 6, 8, seed=10).detach()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    params = _params(name, chunk_tokens=4)
    value = get_loss(name).fn(student, teacher, mask, **params)
    value.backward()
    garbage_s = student.detach().clone()
    garbage_t = teacher.clone()
    garbage_s[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    garbage_t[~mask] = float("nan")  # never read
    garbage_s.requires_grad_()
    again = get_loss(name).fn(garbage_s, garbage_t, mask, **params)
    again.backward()
    assert float(again.detach()) == pytest.approx(float(value.detach()), rel=1e-6, abs=1e-7)
    assert torch.equal(student.grad[~mask], torch.zeros_like(student.grad[~mask]))
    torch.testing.assert_close(garbage_s.grad[mask], student.grad[mask])
    # a mask of all ones is the same as no mask; one of zeros gives 0 and a zero gradient
    ones = get_loss(name).fn(student, teacher, torch.ones(2, 6), **params)
    torch.testing.assert_close(ones, get_loss(name).fn(student, teacher, None, **params))
    empty = _logits(2, 6, 8, seed=9)
    zero = get_loss(name).fn(empty, teacher, torch.zeros(2, 6), **params)
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(empty.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked_in_value_and_gradient(name, masked):
    mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.3) if masked else None
    results = []
    for chunk in (1, 4, 5, 10_000):
        student, teacher = _logits(3, 7, 11, seed=11), _logits(3, 7, 11, seed=12).detach()
        value = get_loss(name).fn(student, teacher, mask, **_params(name, chunk_tokens=chunk, temperature=2.0))
        value.backward()
        results.append((value.detach(), student.grad))
    for value, grad in results[:-1]:
        torch.testing.assert_close(value, results[-1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[-1][1], rtol=1e-5, atol=1e-8)


def test_bf16_logits_get_a_bf16_gradient_computed_in_fp32():
    student32, teacher = _logits(2, 4, 16, seed=13), _logits(2, 4, 16, seed=14).detach()
    student = student32.detach().bfloat16().requires_grad_()
    value = get_loss("token_fkl").fn(student, teacher.bfloat16(), None, chunk_tokens=3)
    value.backward()
    assert value.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    expected = reference("token_fkl", student.detach().double(), teacher.bfloat16().double())
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-4)


def test_peak_memory_is_bounded_by_one_chunk():
    """Forward and backward hold the logits' gradient and one chunk's fp32 temporaries, never
    B x T x V in fp32 (bytes of tensors created inside, counted per ATen operator)."""
    from distill.profile import _LiveTensorBytes

    b, t, v, d = 4, 256, 512, 32
    logits_bytes = b * t * v * 4
    head = nn.Linear(d, v)

    def peak(chunk: int, weight: float = 1.0, loss: str = "token_gjsd") -> int:
        student = head(torch.randn(b, t, d))  # logits with a graph behind them, as from a model
        teacher = torch.randn(b, t, v)
        tracker = _LiveTensorBytes()
        with tracker.mode:
            (weight * get_loss(loss).fn(student, teacher, None, chunk_tokens=chunk)).backward()
        return tracker.peak

    per_chunk_row = v * 4
    small, large, naive = peak(32), peak(64), peak(b * t)
    # the gradient buffer (1 x logits) plus a bounded number of chunk-sized fp32 temporaries
    assert small <= logits_bytes + 40 * 32 * per_chunk_row, small / logits_bytes
    assert large <= logits_bytes + 40 * 64 * per_chunk_row, large / logits_bytes
    assert large - small <= 40 * 32 * per_chunk_row  # what grows with the chunk is the chunk
    assert naive > 8 * logits_bytes  # one chunk for everything: the full-size fp32 temporaries
    # a weighted loss: backward hands on a scaled copy of the buffer
    assert peak(64, weight=0.5) <= 2 * logits_bytes + 40 * 64 * per_chunk_row
    # forward KL's closed-form gradient: fewer temporaries than the autograd path
    assert peak(64, loss="token_fkl") <= logits_bytes + 12 * 64 * per_chunk_row


# ------------------------------------------------------------------------------ vocabularies
@pytest.mark.parametrize("name", ALL)
def test_a_padded_teacher_gives_the_unpadded_loss(name):
    student, teacher = _logits(2, 3, 50, seed=15), _logits(2, 3, 50, seed=16).detach()
    params = _params(name, chunk_tokens=4)
    plain = get_loss(name).fn(student, teacher, None, **params)
    padded = torch.cat([teacher, torch.full((2, 3, 14), -math.inf)], dim=-1)  # 50 -> 64
    garbage = torch.cat([teacher, torch.randn(2, 3, 14) * 30], dim=-1)
    assert float(get_loss(name).fn(student, padded, None, **params, vocab_size=50)) == pytest.approx(float(plain), rel=1e-6)
    assert float(get_loss(name).fn(student, garbage, None, **params, vocab_size=50)) == pytest.approx(float(plain), rel=1e-6)
    # without vocab_size, a width that is the other rounded up to a multiple of 8..256 is padding
    assert float(get_loss(name).fn(student, garbage, None, **params)) == pytest.approx(float(plain), rel=1e-6)
    # a padded student: the padded logits get no gradient
    wide = torch.cat([student.detach(), torch.randn(2, 3, 14)], dim=-1).requires_grad_()
    get_loss(name).fn(wide, teacher, None, **params, vocab_size=50).backward()
    assert float(wide.grad[..., 50:].abs().sum()) == 0.0
    student.grad = None
    plain.backward()
    torch.testing.assert_close(wide.grad[..., :50], student.grad)


def test_common_vocab_accepts_padding_only():
    assert common_vocab(50257, 50304, None) == 50257  # GPT-2 padded to a multiple of 64
    assert common_vocab(50304, 50257, None) == 50257
    assert common_vocab(65, 65, None) == 65
    assert common_vocab(50257, 50304, 50257) == 50257
    with pytest.raises(ValueError, match="set vocab_size"):
        common_vocab(50257, 32000, None)
    with pytest.raises(ValueError, match="not one vocabulary padded"):
        common_vocab(11, 13, None)
    with pytest.raises(ValueError, match="student has 100"):
        common_vocab(100, 200, 150)


class _TokenModel(nn.Module):
    """[B, T] ids -> [B, T, V] logits."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.head(self.emb(ids.long()))


def _lm_batch(mask=None):
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input": ids, "target": torch.roll(ids, -1, 1), "index": torch.arange(3)}
    if mask is not None:
        batch.update(mask)
    return batch


def test_a_real_vocabulary_mismatch_is_a_distill_error_through_the_objective():
    distiller = Distiller(_TokenModel(11, 0), _TokenModel(13, 1), [Term("kd", "token_fkl")])
    with pytest.raises(DistillError, match=r"term 'kd' \(token_fkl\).*11 logits per token and the teacher 13"):
        distiller(_lm_batch())
    padded = Distiller(_TokenModel(11, 0), _TokenModel(16, 1), [Term("kd", "token_fkl")])
    assert torch.isfinite(padded(_lm_batch()).loss)
    with pytest.raises(DistillError, match="vocab_size=12"):
        Distiller(_TokenModel(11, 0), _TokenModel(16, 1), [Term("kd", "token_fkl", params={"vocab_size": 12})])(_lm_batch())


# ------------------------------------------------------------------------------ GKD's beta
def test_gjsd_endpoints_are_forward_and_reverse_kl_and_the_formula_approaches_them_scaled():
    student, teacher = _logits(2, 4, 9, seed=17).detach(), _logits(2, 4, 9, seed=18).detach()
    gjsd = get_loss("token_gjsd").fn
    fkl = float(get_loss("token_fkl").fn(student, teacher))
    rkl = float(get_loss("token_rkl").fn(student, teacher))
    assert float(gjsd(student, teacher, beta=0.0)) == fkl
    assert float(gjsd(student, teacher, beta=1.0)) == rkl
    # inside (0, 1) the formula itself vanishes at both ends: JSD(β) ≈ β·FKL and ≈ (1 − β)·RKL
    small, large = 1e-4, 1 - 1e-4
    assert float(gjsd(student, teacher, beta=small)) / small == pytest.approx(fkl, rel=2e-3)
    assert float(gjsd(student, teacher, beta=large)) / (1 - large) == pytest.approx(rkl, rel=2e-3)
    assert float(gjsd(student, teacher, beta=0.5)) <= math.log(2) + 1e-6  # the ordinary JSD is bounded
    with pytest.raises(ValueError, match="beta"):
        gjsd(student, teacher, beta=1.5)


def test_skew_losses_at_alpha_zero_are_the_plain_kls():
    student, teacher = _logits(1, 3, 5, seed=19).detach(), _logits(1, 3, 5, seed=20).detach()
    assert float(get_loss("token_skl").fn(student, teacher, alpha=0.0)) == float(get_loss("token_fkl").fn(student, teacher))
    assert float(get_loss("token_srkl").fn(student, teacher, alpha=0.0)) == float(get_loss("token_rkl").fn(student, teacher))
    with pytest.raises(ValueError, match="alpha"):
        get_loss("token_skl").fn(student, teacher, alpha=1.0)


# ------------------------------------------------------------------------------ top-k teachers
def _bucket_fkl64(student, teacher, k, mask=None):
    """KL over the teacher's top k tokens plus one bucket for the rest, by definition."""
    values = []
    b, t, _ = student.shape
    for i in range(b):
        for j in range(t):
            if mask is not None and not mask[i, j]:
                continue
            ps, pt = _softmax64(student[i, j], 1.0), _softmax64(teacher[i, j], 1.0)
            top = torch.topk(pt, k).indices
            rest = torch.ones_like(pt, dtype=torch.bool)
            rest[top] = False
            p = torch.cat([pt[top], pt[rest].sum().reshape(1)])
            q = torch.cat([ps[top], ps[rest].sum().reshape(1)])
            values.append(_kl64(p, q))
    return torch.stack(values).mean()


def _rebuilt(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """What a top-k TeacherCache returns: top-k log-probs, the tail spread evenly elsewhere."""
    log_p = torch.log_softmax(teacher.double(), -1)
    top, index = log_p.topk(k, -1)
    tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
    fill = torch.log(tail / (teacher.shape[-1] - k))
    return fill.unsqueeze(-1).expand_as(log_p).clone().scatter(-1, index, top).float()


def test_topk_with_tail_mass_matches_the_bucket_kl_and_never_exceeds_the_dense_kl():
    student, teacher = _logits(2, 5, 30, seed=21), _logits(2, 5, 30, seed=22).detach()
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    fkl = get_loss("token_fkl").fn
    k = 4
    value = fkl(student, teacher, mask, topk=k, chunk_tokens=3)
    value.backward()
    s64 = student.detach().double().requires_grad_()
    expected = _bucket_fkl64(s64, teacher, k, mask)
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    assert float(value) <= float(fkl(student, teacher, mask)) + 1e-6  # coarsening loses information
    torch.testing.assert_close(fkl(student, teacher, mask, topk=30), fkl(student, teacher, mask))


def test_a_cached_topk_teacher_reads_back_the_stored_tail_mass():
    """Rebuilt cache logits with topk=k, and the explicit (log_probs, indices, tail) form, both give
    the bucket KL of the original teacher; the dense rebuilt logits alone do not."""
    student, teacher = _logits(2, 4, 25, seed=23).detach(), _logits(2, 4, 25, seed=24).detach()
    k = 5
    expected = float(_bucket_fkl64(student, teacher, k))
    fkl = get_loss("token_fkl").fn
    rebuilt = _rebuilt(teacher, k)
    assert float(fkl(student, rebuilt, None, topk=k)) == pytest.approx(expected, rel=1e-5)
    log_p = torch.log_softmax(teacher, -1)
    top, index = log_p.topk(k, -1)
    tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
    explicit = fkl(student, TopK(top.half(), index.short(), tail), None)
    assert float(explicit) == pytest.approx(expected, rel=2e-3)  # fp16 values, as a cache stores them
    assert float(fkl(student, [top, index, tail], None)) == pytest.approx(expected, rel=1e-5)
    assert abs(float(fkl(student, rebuilt, None)) - expected) > 1e-3  # the even spread is scored too
    with pytest.raises(ValueError, match="temperature=1.0"):
        fkl(student, TopK(top, index, tail), None, temperature=2.0)
    with pytest.raises(ValueError, match="outside the 20-token vocabulary"):
        fkl(student[..., :20], TopK(top, index, tail), None)


def test_an_explicit_topk_teacher_gets_the_bucket_kl_gradient_even_where_the_student_tail_underflows():
    """Forward KL on an explicit top-k teacher has a closed-form gradient (p_s - p_t on the top k,
    p_s (1 - t_tail / s_tail) on the tail); it matches the float64 bucket KL, also in rows where the
    student's tail mass underflows an fp32 sum (those rows go through the log-space path)."""
    student, teacher = _logits(2, 4, 40, seed=25), _logits(2, 4, 40, seed=26).detach()
    k = 6
    log_p = torch.log_softmax(teacher, -1)
    top, index = log_p.topk(k, -1)
    tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
    with torch.no_grad():  # one row whose student puts all but e^-120 of its mass on the teacher's top k
        student[1, 2] = -60.0
        student[1, 2].scatter_(-1, index[1, 2], 60.0)
    mask = torch.ones(2, 4)
    mask[0, 3] = 0
    fkl = get_loss("token_fkl").fn
    for chunk in (3, 4096):
        student.grad = None
        value = fkl(student, TopK(top, index, tail), mask, chunk_tokens=chunk)
        value.backward()
        s64 = student.detach().double().requires_grad_()
        expected = _bucket_fkl64(s64, teacher, k, mask)
        expected.backward()
        assert torch.isfinite(student.grad).all()
        torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["token_fkl", "token_ce"])
def test_closed_form_gradients_equal_autograd_on_the_same_chunk(name):
    """The closed forms of forward KL (dense, coarsened to top-k, explicit top-k) and of token CE give
    the values and gradients that autograd through the row loss gives."""
    from distill.losses import token_divergences as td

    student, teacher = _logits(3, 5, 33, seed=27).detach(), _logits(3, 5, 33, seed=28).detach()
    mask = torch.ones(3, 5)
    mask[2, 1:] = 0
    if name == "token_ce":
        labels = torch.randint(0, 33, (3, 5), generator=torch.Generator().manual_seed(3))
        cases = [(td.token_ce_plan(name, tuple(student.shape), labels, mask, student.device, chunk_tokens=4,
                                   vocab_size=None, ignore_index=-100), lambda *_: None, [labels])]
    else:
        log_p = torch.log_softmax(teacher, -1)
        top, index = log_p.topk(5, -1)
        tail = log_p.exp().scatter(-1, index, 0.0).sum(-1)
        cases = []
        for temperature, topk, parts in [(1.0, None, [teacher]), (2.5, None, [teacher]), (2.0, 7, [teacher]),
                                         (1.0, None, [top, index, tail])]:
            shape = parts if len(parts) == 3 else tuple(teacher.shape)
            plan = td.divergence_plan(name, tuple(student.shape), shape, mask, student.device,
                                      temperature=temperature, chunk_tokens=4, vocab_size=None, topk=topk,
                                      kl_family=True)
            cases.append((plan, td.forward_kl, parts))
    for plan, row_loss, parts in cases:
        rows = plan.rows
        s = student.reshape(-1, 33)[rows]
        t = [p.reshape(-1, *p.shape[2:])[rows] for p in parts]
        closed = td._closed_form(plan, row_loss, s, t)
        assert closed is not None
        leaf = s.clone().requires_grad_()
        expected = td._chunk_rows(plan, row_loss, leaf, t).sum() / plan.count
        (grad,) = torch.autograd.grad(expected, leaf)
        torch.testing.assert_close(closed[0], expected.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(closed[1], grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ the objective's mask
def test_token_mask_shifts_the_attention_mask_to_the_logits():
    attention = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    shifted = token_mask({"attention_mask": attention})
    assert shifted.tolist() == [
        [True, True, False, False, False],  # right padding: the last real token predicts nothing real
        [False, False, True, True, False],  # left padding: pads predict nothing
        [True, True, True, True, False],
    ]
    explicit = torch.tensor([[1, 0, 1, 0, 1]] * 3)
    assert token_mask({"attention_mask": attention, "mask": explicit}) is explicit
    assert token_mask({"input": attention}) is None


def test_the_distiller_feeds_the_batch_mask_to_token_losses():
    student, teacher = _TokenModel(20, 0), _TokenModel(20, 1)
    terms = [Term("kd", "token_fkl", params={"chunk_tokens": 4}), Term("ce", "token_ce")]
    distiller = Distiller(student, teacher, terms)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    out = distiller(_lm_batch({"attention_mask": attention}))
    ids = _lm_batch()["input"]
    with torch.no_grad():
        s, t = student(ids), teacher(ids)
    expected_mask = token_mask({"attention_mask": attention})
    expected = reference("token_fkl", s, t, expected_mask)
    assert float(out.terms["kd"]) == pytest.approx(float(expected), rel=1e-5)
    targets = torch.roll(ids, -1, 1)
    ce = F.cross_entropy(s[expected_mask], targets[expected_mask])
    assert float(out.terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert not distiller.dry_run(_lm_batch({"attention_mask": attention})).problems
    unmasked = distiller(_lm_batch())
    assert float(unmasked.terms["kd"]) == pytest.approx(float(reference("token_fkl", s, t)), rel=1e-5)


def test_token_ce_matches_cross_entropy_with_ignored_labels():
    logits = _logits(2, 5, 9, seed=25)
    labels = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[0, 1] = -100
    value = get_loss("token_ce").fn(logits, labels, None, chunk_tokens=2)
    value.backward()
    ref = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(ref.transpose(1, 2), labels)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(logits.grad, ref.grad)
    with pytest.raises(ValueError, match="label 9 is outside"):
        get_loss("token_ce").fn(logits, torch.full((2, 5), 9), None)


def test_bad_arguments_say_what_is_wrong():
    student, teacher = _logits(2, 3, 5), _logits(2, 3, 5, seed=1).detach()
    fkl = get_loss("token_fkl").fn
    with pytest.raises(ValueError, match="temperature must be positive"):
        fkl(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fkl(student, teacher, chunk_tokens=0)
    with pytest.raises(ValueError, match="mask"):
        fkl(student, teacher, torch.ones(3, 2))
    with pytest.raises(ValueError, match="differ in their positions"):
        fkl(student, teacher[:, :2])
    with pytest.raises(DistillError, match="no parameter 'beta'"):
        Term("kd", "token_fkl", params={"beta": 0.5})
