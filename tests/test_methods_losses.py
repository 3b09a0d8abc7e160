"""Behaviour of the method losses (DKD, DIST, logit standardisation, Tf-KD, AT, NST, SP, RKD, PKT,
CC): their input checks, the properties each paper claims, and their registration. Properties every
loss must have (finite, zero at the teacher, gradients, bf16, batch order, the objective's dry run)
are checked for every registered loss in test_loss_contract.py; values against formulas written
from the papers are in test_methods_losses_reference.py."""

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

pytestmark = pytest.mark.fast

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


FEATURE_NAMES = ["at", "nst", "sp", "rkd", "pkt", "cc"]
RELATION_NAMES = ["sp", "rkd", "pkt", "cc"]

seeds = st.integers(0, 10_000)


def _registered_example(name, seed):
    """The student and teacher of the example registered with the loss (see losses/registry.py)."""
    ex = get_loss(name).example(_gen(seed))
    return ex["student"], ex["teacher"]


# -- input checks ------------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_wrong_shapes_raise_value_error_naming_the_loss(name):
    fn = get_loss(name).fn
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


@FAST
@given(seed=seeds, batch=st.integers(3, 7))
def test_tf_kd_is_zero_at_its_virtual_teacher_and_positive_elsewhere(seed, batch):
    g = _gen(seed)
    y = _labels(g, batch)
    assert tf_kd_loss(_virtual_teacher_logits(y), y).item() == pytest.approx(0.0, abs=1e-5)
    assert tf_kd_loss(_logits(g, batch), y).item() > 1e-4


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
    fn = get_loss(name).fn
    s, t = _registered_example(name, seed)
    assert fn(s * scale, t).item() == pytest.approx(fn(s, t).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", RELATION_NAMES)
@FAST
@given(seed=seeds, width=st.integers(12, 20))
def test_relation_losses_zero_for_a_rotated_wider_copy_of_the_teacher(name, seed, width):
    # inner products, angles and distances survive x -> x Q with orthonormal rows Q: [D_t, D_s]
    fn = get_loss(name).fn
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

# name -> (function, inputs, parameters with the papers' defaults)
EXPECTED = {
    "dkd": (dkd_loss, ("student", "teacher", "labels"), {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}),
    "dist": (dist_loss, ("student", "teacher"), {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "eps": 1e-8}),
    "kd_std": (kd_std_loss, ("student", "teacher"), {"temperature": 2.0, "eps": 1e-7}),
    "tf_kd": (tf_kd_loss, ("student", "labels"), {"correct_prob": 0.99, "temperature": 20.0}),
    "at": (at_loss, ("student", "teacher"), {"p": 2.0}),
    "nst": (nst_loss, ("student", "teacher"), {}),
    "sp": (sp_loss, ("student", "teacher"), {}),
    "rkd": (rkd_loss, ("student", "teacher"), {"distance_weight": 25.0, "angle_weight": 50.0, "eps": 1e-12}),
    "pkt": (pkt_loss, ("student", "teacher"), {"eps": 1e-7}),
    "cc": (cc_loss, ("student", "teacher"), {"gamma": 0.4, "order": 2}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_with_inputs_params_and_defaults(name):
    import inspect

    assert name in LOSSES
    spec = get_loss(name)
    fn, inputs, defaults = EXPECTED[name]
    assert spec.inputs == inputs and not spec.adapts
    assert spec.fn is fn
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


def test_objective_turns_a_shape_error_into_a_distill_error():
    # NST needs [B, C, H, W]; the pooled pre-logit feature is [B, D]
    distiller = Distiller(CNN(2), CNN(4), [Term("nst", "nst", student="fc:input", teacher="fc:input")])
    with pytest.raises(DistillError, match=r"term 'nst' \(nst\): nst: needs convolutional feature maps"):
        distiller.dry_run(_image_batch())
