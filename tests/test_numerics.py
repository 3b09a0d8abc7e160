"""Numerical faults in training: the gradient norm is logged every epoch, non-finite losses name
their step and term, and running out of memory is one clear error that lists the ways out."""

import math

import pytest
import torch
import yaml
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import distill.trainer as trainer_module
from distill import Distiller, Term, TrainConfig, Trainer
from distill.cli import main
from distill.errors import DistillError
from distill.logbook import read_metrics

pytestmark = pytest.mark.fast


class Loader:
    """A deterministic in-memory loader of 4-feature samples in 3 classes."""

    def __init__(self, n=96, batch_size=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.batch_size, self.epoch = batch_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for k in range(len(self)):
            idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
            yield {"input": self.x[idx], "target": self.y[idx], "index": idx}


def distiller(teacher: nn.Module | None = None) -> Distiller:
    torch.manual_seed(0)
    teacher = teacher or nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    d = Distiller(student, teacher, [Term("hard", "ce", 0.5), Term("soft", "kd", 0.5)])
    d.dry_run(next(iter(Loader())))
    return d


CFG = dict(epochs=2, optimizer="sgd", lr=0.1, progress=False, tensorboard=False)


@pytest.fixture
def step_norms():
    """The total gradient norm the optimizer sees at each step, in order."""
    seen: list[float] = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("every", [1, 4])
def test_grad_norm_is_the_mean_over_the_epochs_sampled_steps(tmp_path, step_norms, monkeypatch, every):
    monkeypatch.setattr(trainer_module, "GRAD_NORM_EVERY", every)
    Trainer(distiller(), Loader(), TrainConfig(**CFG), run_dir=tmp_path).fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    steps = len(Loader())
    assert len(step_norms) == 2 * steps and all(n > 0 for n in step_norms)
    for epoch, row in enumerate(rows):
        sampled = step_norms[epoch * steps:(epoch + 1) * steps][::every]
        assert row["grad_norm"] == pytest.approx(sum(sampled) / len(sampled), rel=1e-5)


def test_grad_norm_with_clipping_is_the_norm_before_clipping(tmp_path, step_norms):
    history = Trainer(distiller(), Loader(), TrainConfig(**CFG, clip_grad_norm=1e-3), run_dir=tmp_path).fit()
    assert all(n <= 1e-3 * 1.0001 for n in step_norms)  # the optimizer saw clipped gradients
    assert all(row["grad_norm"] > 1e-2 for row in history)  # the log shows what they were
    assert [r["grad_norm"] for r in read_metrics(tmp_path / "metrics.csv")] == pytest.approx(
        [r["grad_norm"] for r in history])


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_norm_with_accumulation_counts_optimizer_steps(step_norms, monkeypatch, accum):
    monkeypatch.setattr(trainer_module, "GRAD_NORM_EVERY", 1)
    history = Trainer(distiller(), Loader(), TrainConfig(**CFG, grad_accum=accum)).fit()
    updates = math.ceil(len(Loader()) / accum)  # 6 steps: windows of 2+2+2, or 4+2 (the epoch's end updates)
    assert len(step_norms) == 2 * updates
    for epoch, row in enumerate(history):
        window = step_norms[epoch * updates:(epoch + 1) * updates]
        assert row["grad_norm"] == pytest.approx(sum(window) / updates, rel=1e-5)


def test_mean_norm_leaves_out_fp16_overflow_steps():
    finite = (torch.tensor(3.0), torch.tensor(4.0))  # total 5
    skipped = (torch.tensor(float("inf")), torch.tensor(1.0))
    assert trainer_module._mean_norm([finite, skipped, finite], skip_overflow=True) == pytest.approx(5.0)
    assert math.isinf(trainer_module._mean_norm([finite, skipped], skip_overflow=False))
    assert trainer_module._mean_norm([torch.tensor(2.0), torch.tensor(4.0)], skip_overflow=False) == pytest.approx(3.0)
    assert math.isnan(trainer_module._mean_norm([skipped], skip_overflow=True))


# ------------------------------------------------------------------------------ non-finite losses
class Output:
    def __init__(self, loss, terms):
        self.loss, self.terms = loss, terms


class Overflowing(nn.Module):
    """Two finite terms whose weighted sum overflows float32."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, batch):
        big = self.w * 3e38
        return Output(big + big, {"a": big, "b": big})


def test_an_overflowing_sum_of_finite_terms_is_named():
    with pytest.raises(DistillError, match=r"loss is inf at epoch 1, step 1 \(non-finite terms: none; the sum "
                                           r"overflowed\); lower the learning rate"):
        Trainer(Overflowing(), Loader(), TrainConfig(**CFG)).fit()


# ------------------------------------------------------------------------------ out of memory
class Greedy(nn.Module):
    """A classifier that runs out of memory on its ``fail_at``-th forward pass with gradients."""

    def __init__(self, fail_at: int = 3, error: Exception | None = None, in_features: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(in_features, classes)
        self.calls, self.fail_at = 0, fail_at
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def forward(self, x):
        if torch.is_grad_enabled() and self.training:
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"),
     RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 4 GB. Out of memory")],
)
def test_out_of_memory_in_a_step_explains_the_options(error):
    d = Distiller(Greedy(fail_at=3, error=error), None, [Term("ce", "ce")])
    d.dry_run(next(iter(Loader())))  # forward 1
    with pytest.raises(DistillError) as info:
        Trainer(d, Loader(), TrainConfig(**CFG, grad_accum=2), name="student").fit()  # fails on step 2
    message = str(info.value)
    assert message.startswith("student: out of memory on cpu at epoch 1, step 2 (batch size 16)")
    for option in ("train.batch_size=8 with train.grad_accum=4", "teacher.cache", "train.mixed_precision=bf16",
                   "teacher.precision=bf16"):
        assert option in message
    assert "\n" not in message and info.value.__cause__ is None


def test_other_runtime_errors_pass_through():
    d = Distiller(Greedy(fail_at=2, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied")), None,
                  [Term("ce", "ce")])
    d.dry_run(next(iter(Loader())))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        Trainer(d, Loader(), TrainConfig(**CFG)).fit()


def greedy_digits_model(num_classes, input_shape):
    """A digits classifier for recipes (``tests.test_numerics:greedy_digits_model``) that runs out
    of memory on the second training step (forward 1 is the dry run, 2 the first step)."""
    return Greedy(fail_at=3, in_features=64, classes=num_classes)


def test_out_of_memory_in_a_run_is_one_line_with_exit_2(tmp_path, capsys):
    recipe = {
        "name": "oom", "seeds": [0], "threads": 1,
        "data": {"name": "digits", "train_subset": 128},
        "teacher": {"model": "tests.test_numerics:greedy_digits_model",
                    "train": {"epochs": 1, "batch_size": 32, "tensorboard": False}},
        "student": {"model": "mlp", "kwargs": {"hidden": [4]}},
        "distill": {"terms": [{"loss": "kd"}]},
        "evaluate": {"latency": False},
    }
    path = tmp_path / "oom.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: teacher: out of memory on cpu at epoch 1, step 2 (batch size 32); options: ")
    assert "train.batch_size=16 with train.grad_accum=2" in err
