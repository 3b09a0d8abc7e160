import os

import pytest
import torch
from torch import nn

from distill import Distiller, Term, TrainConfig, Trainer
from distill.callbacks import Callback
from distill.checkpoints import load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.schedules import learning_rate


class Crash(Exception):
    pass


class TinyLoader:
    """A deterministic in-memory loader; can crash at the start of a given epoch."""

    def __init__(self, n=64, batch=16, crash_at_epoch=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.batch, self.epoch, self.crash_at_epoch = batch, 0, crash_at_epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // self.batch

    def __iter__(self):
        if self.crash_at_epoch is not None and self.epoch == self.crash_at_epoch:
            raise Crash()
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for k in range(len(self)):
            idx = perm[k * self.batch:(k + 1) * self.batch]
            yield {"input": self.x[idx], "target": self.y[idx], "index": idx}


def make(student_seed=0):
    torch.manual_seed(0)  # the teacher is fixed (in practice: loaded from its weights)
    teacher = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    torch.manual_seed(student_seed)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    d = Distiller(student, teacher, [Term("hard", "ce", 0.5), Term("soft", "kd", 0.5),
                                     Term("hint", "hint", student="1", teacher="1")])
    d.dry_run(next(iter(TinyLoader())))
    return d


CFG = dict(epochs=3, optimizer="sgd", lr=0.1, schedule="cosine", progress=False)


def test_loss_decreases_and_metrics_csv(tmp_path):
    d = make()
    history = Trainer(d, TinyLoader(), TrainConfig(**{**CFG, "epochs": 6}), run_dir=tmp_path).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "lr", "train_hard", "train_soft", "train_hint", "train_loss"} <= set(header)
    assert (tmp_path / "checkpoint.pt").exists()


def test_resume_after_crash_gives_same_weights_as_uninterrupted(tmp_path):
    whole = make()
    Trainer(whole, TinyLoader(), TrainConfig(**CFG), run_dir=tmp_path / "a").fit()

    crashed = make()
    with pytest.raises(Crash):
        Trainer(crashed, TinyLoader(crash_at_epoch=1), TrainConfig(**CFG), run_dir=tmp_path / "b").fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 0
    torch.manual_seed(1234)  # the resumed process starts with other RNG state
    resumed = make(student_seed=99)  # and other initial weights: the checkpoint must override them
    Trainer(resumed, TinyLoader(), TrainConfig(**CFG), run_dir=tmp_path / "b").fit(resume=True)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_same_seed_same_result_on_cpu(tmp_path):
    a, b = make(), make()
    Trainer(a, TinyLoader(), TrainConfig(**CFG)).fit()
    Trainer(b, TinyLoader(), TrainConfig(**CFG)).fit()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_nan_loss_names_step_and_term():
    d = make()
    loader = TinyLoader()
    loader.x[5] = float("nan")
    with pytest.raises(DistillError, match=r"epoch 1, step \d+ \(non-finite terms: hard, soft, hint"):
        Trainer(d, loader, TrainConfig(**CFG)).fit()


class Snapshots(Callback):
    """The model's weights at the end of each epoch."""

    def __init__(self):
        self.weights = []

    def on_epoch_end(self, run, row):
        self.weights.append({k: v.clone() for k, v in run.unwrapped.state_dict().items()})


def test_early_stopping_and_restore_best():
    d = make()
    calls = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.6])
    config = TrainConfig(**{**CFG, "epochs": 6}, early_stopping_patience=2, restore_best=True)
    snapshots = Snapshots()
    trainer = Trainer(d, TinyLoader(), config, evaluate=lambda m: {"accuracy": next(calls)}, callbacks=[snapshots])
    history = trainer.fit()
    assert len(history) == 4 and trainer.stopped_early
    best = snapshots.weights[1]  # epoch 2 scored 0.7
    assert all(torch.equal(v, best[k]) for k, v in d.state_dict().items())
    assert not all(torch.equal(v, snapshots.weights[-1][k]) for k, v in d.state_dict().items())


def test_restore_best_is_off_by_default_and_monitor_is_set_per_task():
    config = TrainConfig(**{**CFG, "epochs": 3})
    assert config.restore_best is False and config.monitor is None and config.monitored() == "val_accuracy"
    d = make()
    snapshots = Snapshots()
    Trainer(d, TinyLoader(), config, evaluate=lambda m: {"ndcg": 0.5}, callbacks=[snapshots]).fit()
    assert all(torch.equal(v, snapshots.weights[-1][k]) for k, v in d.state_dict().items())  # the last epoch's

    scores = iter([0.3, 0.1, 0.2])  # a loss-like metric: the second epoch is best
    config = TrainConfig(**{**CFG, "epochs": 3}, monitor="val_distance", monitor_mode="min", restore_best=True)
    d, snapshots = make(), Snapshots()
    Trainer(d, TinyLoader(), config, evaluate=lambda m: {"distance": next(scores)}, callbacks=[snapshots]).fit()
    assert all(torch.equal(v, snapshots.weights[1][k]) for k, v in d.state_dict().items())

    config = TrainConfig(**CFG, restore_best=True)  # monitors val_accuracy, which this task lacks
    with pytest.raises(DistillError, match="early stopping monitors 'val_accuracy', which is not among the logged "
                                           "metrics: epoch, lr, train_hard"):
        Trainer(make(), TinyLoader(), config, evaluate=lambda m: {"ndcg": 0.5}).fit()


def test_one_train_config_type():
    import distill
    import distill.trainer
    from distill.train_config import TrainConfig as Config

    assert distill.TrainConfig is distill.trainer.TrainConfig is Config
    with pytest.raises(ValueError, match="restore_bset"):
        TrainConfig(restore_bset=True)  # a typo is an error, as in a recipe
    with pytest.raises(ValueError):
        TrainConfig(grad_accum=0)


def test_grad_accumulation_and_bf16_run():
    d = make()
    config = TrainConfig(**{**CFG, "epochs": 1}, grad_accum=2, mixed_precision="bf16")
    history = Trainer(d, TinyLoader(), config).fit()
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))


def test_schedules():
    assert learning_rate(1.0, 0, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate(1.0, 10, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(0.05, 160, 240, "step", milestones=[150, 180, 210]) == pytest.approx(0.005)
    assert learning_rate(1.0, 0.5, 10, "constant", warmup_epochs=1) == pytest.approx(0.5, rel=1e-6)


def test_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(DistillError, match="cannot be read safely"):
        load_checkpoint(path)
    assert not marker.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError):
        load_checkpoint(path)
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------ accelerate compatibility
# What distill.accelerate_compat relies on from accelerate beyond its documented API: if one of
# these fails after an accelerate upgrade, that function (and the trainer's use of it) needs a look.
def test_accelerate_refuses_other_precision_until_reset_precision_state():
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from distill.accelerate_compat import reset_precision_state

    assert callable(getattr(AcceleratorState, "_reset_state", None))
    reset_precision_state()
    Accelerator(mixed_precision="no", cpu=True)
    device = PartialState().device
    with pytest.raises(ValueError):  # what make_accelerator catches
        Accelerator(mixed_precision="bf16", cpu=True)
    reset_precision_state()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    assert accelerator.mixed_precision == "bf16" and PartialState().device == device  # the process state is kept
    reset_precision_state()


def _prepared(accum=1):
    from accelerate import Accelerator

    from distill.trainer import make_accelerator

    accelerator = make_accelerator(TrainConfig(grad_accum=accum, cpu=True))
    assert isinstance(accelerator, Accelerator)
    torch.manual_seed(0)
    return accelerator, accelerator.prepare(nn.Linear(3, 2))


def test_accelerated_optimizer_steps_only_at_the_end_of_a_window():
    from distill.accelerate_compat import end_window

    accelerator, model = _prepared(accum=2)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).sum().backward()
    end_window(accelerator, False)
    assert accelerator.sync_gradients is False
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(model.weight, before) and model.weight.grad is not None  # skipped, gradients kept
    end_window(accelerator, True)
    assert accelerator.sync_gradients is True
    optimizer.step()
    optimizer.zero_grad()
    assert not torch.equal(model.weight, before) and model.weight.grad is None


def test_plain_optimizer_is_the_wrapped_one_and_steps_alike():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from distill.accelerate_compat import end_window, plain_optimizer

    accelerator, model = _prepared()
    end_window(accelerator, True)
    weights = []
    for direct in (False, True):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        inner = plain_optimizer(accelerator, optimizer)
        assert inner is optimizer.optimizer and isinstance(inner, torch.optim.SGD)
        stepper = inner if direct else optimizer
        for _ in range(2):
            model(torch.ones(4, 3)).pow(2).sum().backward()
            stepper.step()
            stepper.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights)) and not torch.equal(weights[0][0], torch.full((2, 3), 0.5))
    scaled = SimpleNamespace(scaler=object(), distributed_type=DistributedType.NO)  # fp16 loss scaling
    assert plain_optimizer(scaled, optimizer) is None
    deepspeed = SimpleNamespace(scaler=None, distributed_type=DistributedType.DEEPSPEED)
    assert plain_optimizer(deepspeed, optimizer) is None


def test_an_fsdp_plugin_sets_the_environment_for_good_unless_launcher_environment_keeps_it(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from distill.accelerate_compat import launcher_environment, reset_precision_state

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    reset_precision_state()
    try:
        with launcher_environment():
            Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
            assert os.environ.get("ACCELERATE_USE_FSDP") == "true"  # what accelerate leaves behind
        assert "ACCELERATE_USE_FSDP" not in os.environ
    finally:
        reset_precision_state()


def test_a_fresh_accelerator_state_copies_the_process_type_until_prepare_state_puts_it_back():
    """accelerate's FSDP set-up (and distill.accelerate_compat.fsdp_on_cpu) writes FSDP into both
    states; a later AcceleratorState copies PartialState's type, so an unsharded fit after a sharded
    one needs prepare_state to put the process group's own type back."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from distill.accelerate_compat import prepare_state, reset_precision_state

    reset_precision_state()
    own = Accelerator(cpu=True).distributed_type
    try:
        prepare_state(False)  # sees the process group's type
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP  # as after a sharded fit
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        assert Accelerator(cpu=True).distributed_type == DistributedType.FSDP  # reused as it is
        prepare_state(True)  # already sharded: kept
        assert AcceleratorState._shared_state["distributed_type"] == DistributedType.FSDP
        prepare_state(False)
        assert Accelerator(cpu=True).distributed_type == own
    finally:
        PartialState._shared_state["distributed_type"] = own
        reset_precision_state()


def test_accelerate_still_prepares_fsdp2_through_the_method_fsdp_on_cpu_relies_on():
    """distill.accelerate_compat.fsdp_on_cpu switches a gloo process group to FSDP and lets
    accelerate's own FSDP2 preparation run: that preparation must still be the private
    ``Accelerator._prepare_fsdp2`` that ``prepare`` calls for FSDP2 (checked here in one process;
    tests/test_fsdp.py runs it on two)."""
    import inspect

    from accelerate import Accelerator

    assert callable(getattr(Accelerator, "_prepare_fsdp2", None))
    assert "_prepare_fsdp2" in inspect.getsource(Accelerator.prepare)


class ImageLoader(TinyLoader):
    """TinyLoader's samples as 2 x 6 x 6 images (one channel would be NHWC and NCHW at once)."""

    def __init__(self, crash_at_epoch=None):
        super().__init__(n=64, batch=16, crash_at_epoch=crash_at_epoch)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 2, 6, 6, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long()


def conv_pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 2))
    student = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    return Distiller(student, teacher, [Term("hard", "ce", 0.5), Term("soft", "kd", 0.5)])


def test_channels_last_trains_the_same_model_on_nhwc_batches_and_hands_it_back_contiguous(tmp_path):
    seen = []
    results = {}
    for channels_last in (False, True):
        d = conv_pair()
        hook = d.student[0].register_forward_pre_hook(
            lambda _m, args: seen.append((channels_last, args[0].is_contiguous(memory_format=torch.channels_last))))
        cfg = TrainConfig(**{**CFG, "optimizer": "adam", "lr": 0.01, "channels_last": channels_last})
        Trainer(d, ImageLoader(), cfg, run_dir=tmp_path / str(channels_last)).fit()
        hook.remove()
        results[channels_last] = {k: v.clone() for k, v in d.student.state_dict().items()}
        assert all(v.is_contiguous() for v in d.student.state_dict().values())  # handed back as it came
    assert {flag for cl, flag in seen if cl} == {True} and {flag for cl, flag in seen if not cl} == {False}
    for key, value in results[False].items():  # the same training, up to float summation order
        torch.testing.assert_close(results[True][key], value, rtol=1e-4, atol=1e-5)


def test_channels_last_is_refused_with_fsdp_and_a_fit_that_cannot_start_leaves_the_model_contiguous():
    with pytest.raises(ValueError, match="channels_last is not available with sharding: fsdp"):
        TrainConfig(channels_last=True, sharding="fsdp")
    d = conv_pair()

    class Empty(ImageLoader):
        def __len__(self):
            return 0

    with pytest.raises(DistillError, match="yields no batch"):
        Trainer(d, Empty(), TrainConfig(**{**CFG, "channels_last": True})).fit()
    assert all(p.is_contiguous() for p in d.student.parameters())


def test_channels_last_resumes_after_a_crash_to_the_uninterrupted_weights(tmp_path):
    """A checkpoint written in channels-last loads back into the channels-last weights, and a
    resumed fit ends where the uninterrupted one does."""
    cfg = TrainConfig(**{**CFG, "optimizer": "adam", "lr": 0.01, "epochs": 4, "channels_last": True})
    whole = conv_pair()
    Trainer(whole, ImageLoader(), cfg, run_dir=tmp_path / "whole").fit()
    crashed = conv_pair()
    with pytest.raises(Crash):
        Trainer(crashed, ImageLoader(crash_at_epoch=2), cfg, run_dir=tmp_path / "cut").fit()
    assert all(p.is_contiguous() for p in crashed.student.parameters())  # handed back even on a crash
    resumed = conv_pair()
    Trainer(resumed, ImageLoader(), cfg, run_dir=tmp_path / "cut").fit(resume=True)
    for key, value in whole.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, rtol=0, atol=0)
