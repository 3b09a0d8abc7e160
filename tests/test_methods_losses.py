"""Behaviour of the method losses (DKD, DIST, logit standardisation, Tf-KD, AT, NST, SP, RKD, PKT,
CC): properties every loss should have, properties each paper claims, and the objective end to
end. Values against formulas written from the papers are in test_methods_losses_reference.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import Distiller, Term
from distill.errors import DistillError
from distill.losses import (
    LOSSES,
    at_loss,
    cc_loss,
    ce_loss,
    dist_loss,
    dkd_loss,
    get_loss,
    kd_loss,
    kd_std_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    tf_kd_loss,
)

FAST = settings(max_examples=20, deadline=None)
CLASSES = 6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(g, batch):
    return torch.randn(batch, CLASSES, generator=g) * 3


def _labels(g, batch):
    return torch.randint(0, CLASSES, (batch,), generator=g)


def _virtual_teacher_logits(labels, correct_prob=0.99):
    """log p^d of Tf-KD's manually designed teacher."""
    rest = math.log((1 - correct_prob) / (CLASSES - 1))
    out = torch.full((len(labels), CLASSES), rest)
    out[torch.arange(len(labels)), labels] = math.log(correct_prob)
    return out


# name -> (function, make(g, batch) -> (student, *others), student-equals-target(g, batch))
def _logit_case(fn, with_labels=False):
    def labels(g, batch):
        return (_labels(g, batch),) if with_labels else ()

    def make(g, batch):
        return (_logits(g, batch), _logits(g, batch), *labels(g, batch))

    def equal(g, batch):
        t = _logits(g, batch)
        return (t.clone(), t, *labels(g, batch))

    return fn, make, equal


def _tf_kd_case():
    def make(g, batch):
        return _logits(g, batch), _labels(g, batch)

    def equal(g, batch):
        y = _labels(g, batch)
        return _virtual_teacher_logits(y), y

    return tf_kd_loss, make, equal


def _teacher_case(fn, student_shape, teacher_shape):
    def make(g, batch):
        return torch.randn(batch, *student_shape, generator=g), torch.randn(batch, *teacher_shape, generator=g)

    def equal(g, batch):
        t = torch.randn(batch, *teacher_shape, generator=g)
        return t.clone(), t

    return fn, make, equal


CASES = {
    "dkd": _logit_case(dkd_loss, with_labels=True),
    "dist": _logit_case(dist_loss),
    "kd_std": _logit_case(kd_std_loss),
    "tf_kd": _tf_kd_case(),
    "at": _teacher_case(at_loss, (3, 6, 6), (5, 6, 6)),
    "nst": _teacher_case(nst_loss, (3, 6, 6), (5, 6, 6)),
    "sp": _teacher_case(sp_loss, (7,), (4, 3)),
    "rkd": _teacher_case(rkd_loss, (7,), (4, 3)),
    "pkt": _teacher_case(pkt_loss, (7,), (4, 3)),
    "cc": _teacher_case(cc_loss, (7,), (4, 3)),
}
NAMES = sorted(CASES)
FEATURE_NAMES = ["at", "nst", "sp", "rkd", "pkt", "cc"]
RELATION_NAMES = ["sp", "rkd", "pkt", "cc"]

seeds = st.integers(0, 10_000)
batches = st.integers(3, 7)


# -- properties of every loss ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(seed=seeds, batch=batches)
def test_finite_nonnegative_float32(name, seed, batch):
    fn, make, _ = CASES[name]
    value = fn(*make(_gen(seed), batch))
    assert value.shape == () and value.dtype == torch.float32
    assert torch.isfinite(value)
    assert value.item() >= -1e-6  # pkt's eps may dip below 0 by about 1e-7


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(seed=seeds, batch=batches)
def test_zero_when_student_equals_its_target_and_positive_otherwise(name, seed, batch):
    fn, make, equal = CASES[name]
    # DIST's eps counts a class that is nearly constant over the batch as uncorrelated, so only
    # without it is the loss of identical inputs zero (see test_dist_eps_...)
    params = {"eps": 0.0} if name == "dist" else {}
    assert fn(*equal(_gen(seed), batch), **params).item() == pytest.approx(0.0, abs=1e-5)
    assert fn(*make(_gen(seed), batch)).item() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_student(name):
    fn, make, _ = CASES[name]
    student, *others = make(_gen(3), 5)
    student = student.clone().requires_grad_(True)
    others = [o.clone().requires_grad_(True) if o.is_floating_point() else o for o in others]
    fn(student, *others).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 1e-6


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(seed=seeds, batch=batches)
def test_invariant_to_permuting_the_batch(name, seed, batch):
    fn, make, _ = CASES[name]
    args = make(_gen(seed), batch)
    perm = torch.randperm(batch, generator=_gen(seed + 1))
    permuted = [a[perm] for a in args]
    assert fn(*permuted).item() == pytest.approx(fn(*args).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_fp32_close_to_fp32_value(name):
    fn, make, _ = CASES[name]
    args = make(_gen(4), 8)
    reference = fn(*args).item()
    low_args = [a.bfloat16() if a.is_floating_point() else a for a in args]
    low_args[0].requires_grad_(True)
    value = fn(*low_args)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(reference, rel=0.05, abs=1e-3)
    value.backward()
    assert low_args[0].grad.dtype == torch.bfloat16 and torch.isfinite(low_args[0].grad.float()).all()


BAD_INPUTS = {
    "dkd": [
        (torch.randn(4, 6), torch.randn(4, 5), torch.zeros(4, dtype=torch.long)),  # classes differ
        (torch.randn(4, 6), torch.randn(4, 6), torch.zeros(3, dtype=torch.long)),  # labels short
        (torch.randn(4, 6), torch.randn(4, 6), torch.full((4,), 6)),  # label out of range
        (torch.randn(4, 6), torch.randn(4, 6), torch.full((4,), -1)),  # negative label
        (torch.randn(4, 6), torch.randn(4, 6), torch.zeros(4, 6)),  # one-hot floats
        (torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long)),  # one class
    ],
    "dist": [
        (torch.randn(4, 6), torch.randn(4, 5)),
        (torch.randn(1, 6), torch.randn(1, 6)),  # one sample: no intra-class correlation
        (torch.randn(6), torch.randn(6)),
    ],
    "kd_std": [(torch.randn(4, 6), torch.randn(5, 6)), (torch.randn(4, 1), torch.randn(4, 1))],
    "tf_kd": [
        (torch.randn(4, 6), torch.zeros(5, dtype=torch.long)),
        (torch.randn(4, 6), torch.full((4,), 9)),
        (torch.randn(4, 6), torch.rand(4)),
    ],
    "at": [(torch.randn(4, 3, 6, 6), torch.randn(5, 3, 6, 6)), (torch.randn(4, 36), torch.randn(4, 36))],
    "nst": [(torch.randn(4, 3, 6, 6), torch.randn(5, 3, 6, 6)), (torch.randn(4, 3, 36), torch.randn(4, 3, 36))],
    "sp": [(torch.randn(4, 7), torch.randn(5, 7)), (torch.randn(1, 7), torch.randn(1, 7))],
    "rkd": [(torch.randn(4, 7), torch.randn(5, 7)), (torch.randn(1, 7), torch.randn(1, 7))],
    "pkt": [(torch.randn(4, 7), torch.randn(5, 7)), (torch.randn(1, 7), torch.randn(1, 7))],
    "cc": [(torch.randn(4, 7), torch.randn(5, 7)), (torch.randn(1, 7), torch.randn(1, 7))],
}


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_raise_value_error_naming_the_loss(name):
    fn = CASES[name][0]
    for args in BAD_INPUTS[name]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            fn(*args)


@pytest.mark.parametrize(
    "fn, args, params",
    [
        (dkd_loss, (torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)),
         {"temperature": 0}),
        (dist_loss, (torch.randn(2, 3), torch.randn(2, 3)), {"temperature": -1}),
        (kd_std_loss, (torch.randn(2, 3), torch.randn(2, 3)), {"temperature": 0}),
        (tf_kd_loss, (torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), {"correct_prob": 1.0}),
        (tf_kd_loss, (torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), {"temperature": 0}),
        (at_loss, (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)), {"p": 0}),
        (cc_loss, (torch.randn(2, 3), torch.randn(2, 3)), {"order": -1}),
        (cc_loss, (torch.randn(2, 3), torch.randn(2, 3)), {"gamma": 0}),
    ],
)
def test_bad_parameters_raise_value_error(fn, args, params):
    with pytest.raises(ValueError):
        fn(*args, **params)


# -- what each paper claims ------------------------------------------------------------------


def test_dkd_decomposes_classic_kd():
    # Zhao et al. 2022, Eq. 3: KD = TCKD + (1 - p_t[y]) * NCKD, per sample
    g = _gen(5)
    for _ in range(5):
        s, t, y = _logits(g, 1), _logits(g, 1), _labels(g, 1)
        T = 4.0
        weight = 1 - F.softmax(t / T, dim=1)[0, y[0]].item()
        assert dkd_loss(s, t, y, alpha=1.0, beta=weight, temperature=T).item() == pytest.approx(
            kd_loss(s, t, temperature=T).item(), rel=1e-5
        )


def test_dkd_target_part_ignores_how_the_rest_is_spread():
    g = _gen(6)
    s, t, y = _logits(g, 4), _logits(g, 4), torch.zeros(4, dtype=torch.long)
    swapped = s.clone()
    swapped[:, [1, 2]] = s[:, [2, 1]]  # reorder two non-target classes
    tckd = lambda x: dkd_loss(x, t, y, alpha=1.0, beta=0.0).item()  # noqa: E731
    nckd = lambda x: dkd_loss(x, t, y, alpha=0.0, beta=1.0).item()  # noqa: E731
    assert tckd(swapped) == pytest.approx(tckd(s), rel=1e-5)
    assert nckd(swapped) != pytest.approx(nckd(s), rel=1e-3)
    assert dkd_loss(s, t, y, alpha=0.0, beta=0.0).item() == 0.0


def test_dist_eps_counts_a_class_constant_over_the_batch_as_uncorrelated():
    # the authors' eps in the correlation's denominator: for identical inputs, a class whose
    # probability barely varies over the batch adds (about) 1 / C to the intra-class term
    g = _gen(13)
    t = torch.randn(5, CLASSES, generator=g)
    t[:, 0] = -40.0  # class 0 has probability ~1e-18 in every sample
    assert dist_loss(t, t.clone(), beta=0.0, gamma=1.0).item() == pytest.approx(1 / CLASSES, rel=1e-3)
    assert dist_loss(t, t.clone(), beta=0.0, gamma=1.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(t, t.clone(), beta=1.0, gamma=0.0).item() == pytest.approx(0.0, abs=1e-5)


@FAST
@given(seed=seeds, scale=st.floats(0.05, 20.0), shift=st.floats(-50.0, 50.0))
def test_kd_std_ignores_each_samples_logit_scale_and_shift(seed, scale, shift):
    # Sun et al. 2024: the student need only match the teacher's logit relations
    g = _gen(seed)
    s, t = _logits(g, 5), _logits(g, 5)
    per_sample = torch.linspace(0.5, 2.0, 5)[:, None]
    moved = s * scale * per_sample + shift
    assert kd_std_loss(moved, t).item() == pytest.approx(kd_std_loss(s, t).item(), rel=1e-4, abs=1e-6)
    assert kd_std_loss(t * scale + shift, t).item() == pytest.approx(0.0, abs=1e-5)


def test_tf_kd_at_temperature_one_is_label_smoothing():
    # Yuan et al. 2020: label smoothing is KD from a virtual teacher; at T = 1,
    # KL(p^d || p) = CE with smoothing eps minus the entropy of p^d
    g = _gen(7)
    s, y = _logits(g, 8), _labels(g, 8)
    a = 0.9
    eps = (1 - a) * CLASSES / (CLASSES - 1)
    entropy = -(a * math.log(a) + (1 - a) * math.log((1 - a) / (CLASSES - 1)))
    expected = ce_loss(s, y, label_smoothing=eps).item() - entropy
    assert tf_kd_loss(s, y, correct_prob=a, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_at_depends_on_the_attention_map_only():
    g = _gen(8)
    s, t = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 9, 6, 6, generator=g)
    doubled = torch.cat([s, -s], dim=1)  # same |f|^p mean over channels, twice the channels
    assert at_loss(doubled, t).item() == pytest.approx(at_loss(s, t).item(), rel=1e-5)
    # a larger student map is pooled to the teacher's size: a 2x2-constant upsampling of the
    # student's attention map pools back to it
    small = torch.randn(3, 4, 3, 3, generator=g)
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    t_small = torch.randn(3, 9, 3, 3, generator=g)
    assert at_loss(big, t_small).item() == pytest.approx(at_loss(small, t_small).item(), rel=1e-5)
    assert at_loss(t_small, big).item() == pytest.approx(at_loss(t_small, small).item(), rel=1e-5)


def test_nst_treats_channels_as_an_unordered_set():
    g = _gen(9)
    s, t = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 7, 4, 4, generator=g)
    shuffled = s[:, torch.randperm(5, generator=g)]
    assert nst_loss(shuffled, t).item() == pytest.approx(nst_loss(s, t).item(), rel=1e-5)
    # the MMD between a set and the same set repeated is zero
    assert nst_loss(torch.cat([t, t], dim=1), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", FEATURE_NAMES)
@FAST
@given(seed=seeds, scale=st.floats(0.01, 100.0))
def test_feature_and_relation_losses_ignore_the_students_scale(name, seed, scale):
    fn, make, _ = CASES[name]
    s, t = make(_gen(seed), 5)
    assert fn(s * scale, t).item() == pytest.approx(fn(s, t).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", RELATION_NAMES)
@FAST
@given(seed=seeds, width=st.integers(12, 20))
def test_relation_losses_zero_for_a_rotated_wider_copy_of_the_teacher(name, seed, width):
    # inner products, angles and distances survive x -> x Q with orthonormal rows Q: [D_t, D_s]
    fn = CASES[name][0]
    g = _gen(seed)
    t = torch.randn(6, 4, 3, generator=g)
    q, _ = torch.linalg.qr(torch.randn(width, 12, generator=g, dtype=torch.float64))
    s = (t.reshape(6, 12).double() @ q.t()).float()  # [6, width], same Gram matrix as t
    assert fn(s, t).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_ignores_translation_and_each_part_can_be_switched_off():
    g = _gen(10)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 8, generator=g)
    assert rkd_loss(s + 3.0, t).item() == pytest.approx(rkd_loss(s, t).item(), rel=1e-4)
    d = rkd_loss(s, t, distance_weight=1.0, angle_weight=0.0).item()
    a = rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0).item()
    assert d > 0 and a > 0
    assert rkd_loss(s, t).item() == pytest.approx(25 * d + 50 * a, rel=1e-5)


def test_relation_losses_accept_duplicate_samples_with_finite_gradients():
    g = _gen(11)
    s = torch.randn(5, 6, generator=g)
    s = torch.cat([s, s[:2]]).requires_grad_(True)  # two samples twice: zero distances
    t = torch.randn(7, 4, generator=g)
    for fn in (sp_loss, rkd_loss, pkt_loss, cc_loss):
        s.grad = None
        value = fn(s, t)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all(), fn.__name__


# -- registry and objective ------------------------------------------------------------------

EXPECTED = {
    "dkd": (("student", "teacher", "labels"), {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}),
    "dist": (("student", "teacher"), {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "eps": 1e-8}),
    "kd_std": (("student", "teacher"), {"temperature": 2.0, "eps": 1e-7}),
    "tf_kd": (("student", "labels"), {"correct_prob": 0.99, "temperature": 20.0}),
    "at": (("student", "teacher"), {"p": 2.0}),
    "nst": (("student", "teacher"), {}),
    "sp": (("student", "teacher"), {}),
    "rkd": (("student", "teacher"), {"distance_weight": 25.0, "angle_weight": 50.0, "eps": 1e-12}),
    "pkt": (("student", "teacher"), {"eps": 1e-7}),
    "cc": (("student", "teacher"), {"gamma": 0.4, "order": 2}),
}


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_inputs_params_and_defaults(name):
    import inspect

    assert name in LOSSES
    spec = get_loss(name)
    inputs, defaults = EXPECTED[name]
    assert spec.inputs == inputs and not spec.adapts
    assert spec.fn is CASES[name][0]
    assert spec.param_names() == list(defaults)
    sig = inspect.signature(spec.fn)
    assert {n: sig.parameters[n].default for n in defaults} == defaults
    Term("t", name, params=dict(defaults))
    with pytest.raises(DistillError, match="has no parameter"):
        Term("t", name, params={"no_such_param": 1})


class CNN(nn.Module):
    def __init__(self, width: int, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def _image_batch(n=8):
    g = _gen(12)
    return {"input": torch.randn(n, 3, 8, 8, generator=g), "target": _labels(g, n)}


TERMS = {
    "logits": [
        Term("hard", "ce", weight=1.0),
        Term("dkd", "dkd", params={"beta": 2.0}),
        Term("dist", "dist", params={"temperature": 4.0}),
        Term("kd_std", "kd_std"),
        Term("tf_kd", "tf_kd", params={"correct_prob": 0.9}),
    ],
    "features": [
        Term("at", "at", student="stem", teacher="block", weight=1000.0),  # 8x8 student, 4x4 teacher
        Term("at_same", "at", student="block", teacher="block"),
        Term("nst", "nst", student="block", teacher="block", weight=50.0),
    ],
    "relations": [
        Term("sp", "sp", student="block", teacher="block", weight=3000.0),
        Term("rkd", "rkd", student="fc:input", teacher="fc:input"),
        Term("pkt", "pkt", student="fc:input", teacher="fc:input", weight=30000.0),
        Term("cc", "cc", student="fc:input", teacher="block"),
    ],
}


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_dry_run_reports_no_problems_for_a_cnn_pair(kind):
    torch.manual_seed(0)
    distiller = Distiller(CNN(2), CNN(4), TERMS[kind])
    report = distiller.dry_run(_image_batch())
    assert report.problems == []
    assert set(report.terms) == {t.name for t in TERMS[kind]}
    assert all(math.isfinite(v) and v > 0 for v in report.terms.values())
    out = distiller(_image_batch())
    out.loss.backward()
    assert distiller.student.stem[0].weight.grad.abs().sum() > 0


def test_objective_turns_a_shape_error_into_a_distill_error():
    # NST needs [B, C, H, W]; the pooled pre-logit feature is [B, D]
    distiller = Distiller(CNN(2), CNN(4), [Term("nst", "nst", student="fc:input", teacher="fc:input")])
    with pytest.raises(DistillError, match=r"term 'nst' \(nst\): nst: needs convolutional feature maps"):
        distiller.dry_run(_image_batch())
