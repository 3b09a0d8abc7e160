import pytest
import torch
from torch import nn

from distill import Distiller, Term
from distill.errors import DistillError

pytestmark = pytest.mark.fast


class Net(nn.Module):
    def __init__(self, width: int, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return {"input": torch.randn(n, 4, generator=g), "target": torch.randint(0, 3, (n,), generator=g)}


TERMS = [
    Term("hard", "ce", weight=0.1),
    Term("soft", "kd", weight=0.9, params={"temperature": 4.0}),
    Term("hint", "hint", student="body", teacher="body", weight=1.0),
]


def test_total_is_weighted_sum_of_named_terms():
    d = Distiller(Net(5), Net(16), TERMS)
    d.dry_run(batch())
    out = d(batch())
    assert set(out.terms) == {"hard", "soft", "hint"}
    expected = 0.1 * out.terms["hard"] + 0.9 * out.terms["soft"] + out.terms["hint"]
    assert torch.allclose(out.loss, expected)


def test_adapters_created_from_dry_run_shapes_and_trained():
    d = Distiller(Net(5), Net(16), TERMS)
    report = d.dry_run(batch())
    assert "hint" in report.adapters and "(8, 5) -> (8, 16)" in report.adapters["hint"]
    assert report.student_taps["body"] == (8, 5) and report.teacher_taps["body"] == (8, 16)
    assert not report.problems
    d(batch()).loss.backward()
    assert d.adapters["hint"].weight.grad.abs().sum() > 0
    assert d.student.fc.weight.grad.abs().sum() > 0


def test_forward_before_dry_run_with_adapter_terms_is_an_error():
    d = Distiller(Net(5), Net(16), TERMS)
    with pytest.raises(DistillError, match="dry_run"):
        d(batch())


def test_teacher_stays_frozen_in_eval_and_out_of_state_dict():
    teacher = Net(16)
    teacher.body.append(nn.Dropout(0.5))
    d = Distiller(Net(5), teacher, TERMS[:2])
    d.train()
    teacher.train()  # even if someone flips it, the signal puts it back in eval
    out1, out2 = d(batch()).teacher["logits"], d(batch()).teacher["logits"]
    assert torch.equal(out1, out2)
    assert not teacher.training
    assert not any(k.startswith("teacher") for k in d.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    params = {id(p) for p in d.parameters()}
    assert not any(id(p) in params for p in teacher.parameters())
    d(batch()).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_dry_run_leaves_student_unchanged():
    student = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    d = Distiller(student, Net(16), TERMS[:2])
    d.dry_run(batch())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_dry_run_flags_terms_without_gradient():
    import copy

    # a student equal to its teacher: the KD term is zero
    teacher = Net(5)
    report = Distiller(copy.deepcopy(teacher), teacher, [Term("soft", "kd")]).dry_run(batch())
    assert any("is zero" in p for p in report.problems)
    # a tap that does not depend on trainable student weights gives the student no gradient,
    # even though its adapter would train
    student = Net(5)
    student.body.requires_grad_(False)
    report = Distiller(student, Net(16), [Term("h", "hint", student="body", teacher="body")]).dry_run(batch())
    assert any("no gradient" in p for p in report.problems)
    # the very same module as student and teacher: frozen, so nothing trains
    report = Distiller(teacher, teacher, [Term("soft", "kd")]).dry_run(batch())
    assert any("does not depend on the student" in p for p in report.problems)
    # a healthy pair has no problems
    assert not Distiller(Net(5), Net(16), [Term("soft", "kd")]).dry_run(batch()).problems


def test_teacher_terms_need_a_teacher_and_names_are_unique():
    with pytest.raises(DistillError, match="need a teacher"):
        Distiller(Net(5), None, [Term("soft", "kd")])
    with pytest.raises(DistillError, match="unique"):
        Distiller(Net(5), None, [Term("a", "ce"), Term("a", "ce")])


def test_tuple_batches_and_export():
    d = Distiller(Net(5), Net(16), TERMS[:2])
    b = batch()
    out = d((b["input"], b["target"]))
    assert torch.isfinite(out.loss)
    assert d.export_student() is d.student


def test_bf16_teacher_outputs_fp32():
    from distill.signals import LiveTeacher

    signal = LiveTeacher(Net(16), precision="bf16")
    out = signal.outputs(batch(), ["body"])
    assert out["logits"].dtype == torch.float32 and out["body"].dtype == torch.float32
