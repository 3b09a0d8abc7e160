"""Several teachers and chains: ensembles, teacher assistants, born-again generations, mutual
learning; and the objective features they and the feature methods rest on (multi-tap terms, loss
modules, term warm-up)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import Distiller, Term
from distill.ensemble import TeacherEnsemble
from distill.errors import DistillError
from distill.losses.registry import LOSSES, register_loss
from distill.mutual import MutualLearner, PeerSignal
from distill.pipeline import run_recipe
from distill.recipes import load_recipe


def mlp(hidden=16, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 8, generator=g), "target": torch.randint(0, 4, (n,), generator=g),
            "index": torch.arange(n)}


# -- ensemble -------------------------------------------------------------------------------
def test_ensemble_logits_is_weighted_mean():
    a, b = mlp(seed=1), mlp(seed=2)
    x = batch()["input"]
    ens = TeacherEnsemble([a, b], weights=[1, 3], combine="logits")
    expected = 0.25 * a(x) + 0.75 * b(x)
    assert torch.allclose(ens(x), expected, atol=1e-6)


def test_ensemble_probs_softmax_is_mean_distribution():
    a, b, c = mlp(seed=1), mlp(seed=2), mlp(seed=3)
    x = batch()["input"]
    ens = TeacherEnsemble([a, b, c], combine="probs")
    mean_probs = (F.softmax(a(x), -1) + F.softmax(b(x), -1) + F.softmax(c(x), -1)) / 3
    assert torch.allclose(F.softmax(ens(x), -1), mean_probs, atol=1e-6)
    assert torch.allclose(ens(x).exp().sum(-1), torch.ones(12), atol=1e-5)  # log of a distribution


def test_ensemble_errors_and_taps_into_members():
    with pytest.raises(DistillError, match="weights"):
        TeacherEnsemble([mlp(), mlp()], weights=[1.0])
    with pytest.raises(DistillError, match="combine"):
        TeacherEnsemble([mlp()], combine="votes")
    ens = TeacherEnsemble([mlp(seed=1), mlp(seed=2)])
    d = Distiller(mlp(hidden=6), ens, [Term("soft", "kd"), Term("h", "hint", student="1", teacher="members.1.1")])
    report = d.dry_run(batch())
    assert not report.problems and report.teacher_taps["members.1.1"] == (12, 16)


# -- multi-tap terms and loss modules ---------------------------------------------------------
@register_loss("_test_pairsum", inputs=("student", "teacher"))
def _pairsum(student, teacher):
    assert isinstance(student, list) and isinstance(teacher, list)
    return sum(((s.mean(1) - t.mean(1)) ** 2).mean() for s, t in zip(student, teacher))


@register_loss("_test_scaled", inputs=("student", "teacher"), module=True)
class _Scaled(nn.Module):
    needs = ("num_samples",)

    def __init__(self, student_shape, teacher_shape, *, init=2.0, num_samples=None):
        super().__init__()
        self.shapes = (student_shape, teacher_shape)
        self.num_samples = num_samples
        self.scale = nn.Parameter(torch.tensor(init))
        self.register_buffer("seen", torch.zeros(num_samples))

    def forward(self, student, teacher):
        return ((self.scale * student.mean(1) - teacher.mean(1)) ** 2).mean()


def test_multi_tap_term_gets_lists():
    d = Distiller(mlp(hidden=6), mlp(seed=1), [Term("pairs", "_test_pairsum", student=["1", "3"], teacher=["1", "3"])])
    out = d(batch())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert set(out.teacher) == {"1", "3", "logits"}


def test_loss_module_built_from_shapes_and_trained():
    assert LOSSES.get("_test_scaled").param_names() == ["init"]  # num_samples is not the user's
    with pytest.raises(DistillError, match="num_samples"):
        Distiller(mlp(hidden=6), mlp(seed=1), [Term("s", "_test_scaled", student="1", teacher="1")])
    d = Distiller(mlp(hidden=6), mlp(seed=1), [Term("s", "_test_scaled", student="1", teacher="1",
                                                    params={"init": 0.5})], num_samples=100)
    with pytest.raises(DistillError, match="dry_run"):
        d(batch())
    d.dry_run(batch())
    module = d.loss_modules["s"]
    assert module.shapes == ((12, 6), (12, 16)) and module.num_samples == 100
    assert float(module.scale.detach()) == 0.5
    assert any(p is module.scale for p in d.parameters())  # trained with the student
    assert "loss_modules.s.seen" in d.state_dict()  # checkpointed with it
    assert all(not k.startswith("loss_modules") for k in d.export_student().state_dict())


def test_term_warmup_ramps_weight():
    d = Distiller(mlp(hidden=6), mlp(seed=1), [Term("kd", "kd", weight=2.0, warmup_epochs=4)])
    b = batch()
    full = d(b).terms["kd"]
    assert torch.allclose(d(b).loss, 2.0 * full)  # no progress reported: the full weight
    d.set_progress(1.0)
    assert torch.allclose(d(b).loss, 0.5 * full)
    d.set_progress(10.0)
    assert torch.allclose(d(b).loss, 2.0 * full)
    with pytest.raises(DistillError, match="warmup"):
        Term("kd", "kd", warmup_epochs=-1)


# -- mutual learning ----------------------------------------------------------------------------
def test_peer_signal_is_mean_of_peers_without_grad():
    a, b = mlp(seed=1), mlp(seed=2)
    x = batch()
    out = PeerSignal([a, b]).outputs(x, [])
    assert torch.allclose(out["logits"], (a(x["input"]) + b(x["input"])) / 2, atol=1e-6)
    assert not out["logits"].requires_grad


def test_mutual_learning_trains_both_peers_against_each_other():
    a, b = mlp(seed=1), mlp(seed=2)
    learner = MutualLearner([a, b], [Term("ce", "ce"), Term("kd", "kd", params={"temperature": 1.0})])
    x = batch(n=32)
    report = learner.dry_run(x)
    assert not report.problems and set(report.terms) == {"ce_0", "kd_0", "ce_1", "kd_1"}
    out = learner(x)
    # peer 0's mimicry term is KL(p_1 || p_0), peer 1's is KL(p_0 || p_1)
    with torch.no_grad():
        la, lb = a(x["input"]), b(x["input"])
    expected0 = F.kl_div(F.log_softmax(la, -1), F.log_softmax(lb, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(out.terms["kd_0"], expected0, atol=1e-5)
    grads = torch.autograd.grad(out.loss, [a[0].weight, b[0].weight])
    assert all(g.abs().sum() > 0 for g in grads)
    optim = torch.optim.Adam(learner.parameters(), lr=1e-2)
    first = float((out.terms["kd_0"] + out.terms["kd_1"]).detach())
    for _ in range(60):
        o = learner(x)
        optim.zero_grad()
        o.loss.backward()
        optim.step()
    o = learner(x)
    assert float((o.terms["kd_0"] + o.terms["kd_1"]).detach()) < first  # the peers move toward each other
    assert learner.export_student() is a


# -- recipes end to end ---------------------------------------------------------------------------
BASE = {
    "name": "chain",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}, "train": {"epochs": 3, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "tensorboard": False},
    "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]},
    "evaluate": {"latency": False},
}


def _recipe(**changes):
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return load_recipe(data)


def test_recipe_ensemble_assistant_chain(tmp_path):
    recipe = _recipe(**{
        "teacher.ensemble": {"members": [{"model": "mlp", "kwargs": {"hidden": [32]},
                                          "train": {"epochs": 2, "lr": 0.01, "batch_size": 64}}],
                             "combine": "probs"},
        "assistants": [{"model": "mlp", "kwargs": {"hidden": [24]}}],
    })
    results = run_recipe(recipe, tmp_path / "run", progress=False)
    stages = {p.name for p in (tmp_path / "run" / "stages").iterdir()}
    assert {"teacher", "teacher-member1", "assistant1", "baseline-seed0", "student-seed0"} <= stages
    assert results["assistants"][0]["model"] == "mlp" and results["assistants"][0]["accuracy"] > 0.3
    assert results["assistants"][0]["params"] > results["student"]["params"]
    assert results["teacher"]["params"] > results["assistants"][0]["params"]  # both members counted


def test_recipe_born_again_and_mutual(tmp_path):
    results = run_recipe(_recipe(**{"distill.generations": 3}), tmp_path / "ban", progress=False)
    assert len(results["generations"]) == 3 and results["generations"][-1] == results["student"]["accuracy"]
    assert (tmp_path / "ban" / "stages" / "student-gen2-seed0" / "model.safetensors").exists()
    results = run_recipe(_recipe(**{"distill.peers": 2}), tmp_path / "dml", progress=False)
    assert 0.3 < results["student"]["accuracy"] <= 1.0
    history = json.loads((tmp_path / "dml" / "stages" / "student-seed0" / "result.json").read_text())["history"]
    assert {"train_soft_0", "train_soft_1"} <= set(history[0])
    with pytest.raises(DistillError, match="peers"):
        _recipe(**{"distill.peers": 2, "distill.generations": 2})
