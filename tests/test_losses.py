import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses import LOSSES, ce_loss, get_loss, hint_loss, kd_loss

pytestmark = pytest.mark.fast


def reference_kd(s, t, T):
    """KL(p_t || p_s) * T^2 written from the paper's definition, in probability space."""
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = [math.exp(v / T) for v in row_s]
        zt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(s) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_matches_paper_formula(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    assert kd_loss(s, t, temperature=T).item() == pytest.approx(reference_kd(s, t, T), rel=1e-5)


def test_kd_zero_when_equal_and_positive_otherwise():
    x = torch.randn(4, 10)
    assert kd_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(x, torch.randn(4, 10)).item() > 0


def test_kd_gradient_reaches_student_not_teacher():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    kd_loss(s, t).backward()
    assert s.grad.abs().sum() > 0


def test_kd_gradient_matches_hinton_high_temperature_limit():
    # dL/ds = T * (p_s - p_t) / B for the T^2-scaled loss: check against the closed form.
    T = 3.0
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7)
    kd_loss(s, t, temperature=T).backward()
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / 5
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_kd_batch_permutation_invariant_and_bf16():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    perm = torch.randperm(8)
    assert kd_loss(s[perm], t[perm]).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-5)
    low = kd_loss(s.bfloat16(), t.bfloat16())
    assert torch.isfinite(low) and low.item() == pytest.approx(kd_loss(s, t).item(), rel=0.05)


def test_kd_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="same number of classes"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 6))


def test_ce_and_hint():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert ce_loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert hint_loss(a, a).item() == 0.0


def test_registry_knows_inputs_and_params():
    assert get_loss("kd").needs_teacher and not get_loss("ce").needs_teacher
    assert get_loss("hint").adapts
    assert get_loss("kd").param_names() == ["temperature"]
    with pytest.raises(DistillError, match="no parameter 'temprature'"):
        get_loss("kd").check_params({"temprature": 2})
    with pytest.raises(DistillError, match="unknown loss 'kdd'; nearest: kd"):
        get_loss("kdd")
    assert {"kd", "ce", "hint"} <= set(LOSSES.names())
