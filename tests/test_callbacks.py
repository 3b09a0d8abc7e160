"""The trainer's callbacks: the hooks and their order, stopping, state saved with checkpoints,
callbacks added to every fit, and the progress display at 80 columns."""

import io
import re

import pytest
import torch
from rich.console import Console
from torch import nn

from distill import Distiller, Term, TrainConfig, Trainer
from distill.callbacks import (Callback, Checkpointing, EarlyStopping, EpochHook, MetricsLogger, ProgressDisplay,
                               add_global_callback, describe)
from distill.checkpoints import load_checkpoint
from distill.errors import DistillError

from test_trainer import CFG, Crash, TinyLoader, make  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.fast

STEPS = len(TinyLoader())  # 4


class Recorder(Callback):
    """Every hook call, in order."""

    def __init__(self):
        self.events = []

    def on_fit_start(self, run):
        self.events.append(("start", run.start_epoch))

    def on_step_end(self, run):
        self.events.append(("step", run.epoch, run.step, round(run.stats.means()["loss"], 6)))

    def on_epoch_end(self, run, row):
        self.events.append(("epoch", row["epoch"]))

    def on_fit_end(self, run):
        self.events.append(("end", type(run.error).__name__ if run.error else None))


def test_hooks_are_called_in_order_with_the_state_of_the_fit(tmp_path):
    recorder = Recorder()
    trainer = Trainer(make(), TinyLoader(), TrainConfig(**{**CFG, "epochs": 2}), run_dir=tmp_path, callbacks=[recorder])
    history = trainer.fit()
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start"] + (["step"] * STEPS + ["epoch"]) * 2 + ["end"]
    assert [e[1:3] for e in recorder.events if e[0] == "step"] == [(e, s) for e in range(2) for s in range(STEPS)]
    last_step = [e for e in recorder.events if e[0] == "step"][-1]
    assert last_step[3] == pytest.approx(history[-1]["train_loss"], rel=1e-5)  # run.stats: the running means
    assert recorder.events[-1] == ("end", None)
    own = [type(c) for c in trainer_callbacks(trainer, tmp_path)]
    assert own == [Checkpointing, MetricsLogger]  # no early stopping, progress or hook asked for


def trainer_callbacks(trainer, run_dir):
    """The callbacks a fit of ``trainer`` starts with (its own, then the given ones)."""
    seen = []

    class Peek(Callback):
        def on_fit_start(self, run):
            seen.extend(c for c in run.callbacks if not isinstance(c, (Peek, Recorder)))
            raise Crash

    trainer.callbacks.append(Peek())
    with pytest.raises(Crash):
        trainer.fit()
    trainer.callbacks.pop()
    return seen


def test_the_trainers_own_callbacks_and_their_order(tmp_path):
    config = TrainConfig(**{**CFG, "progress": True}, early_stopping_patience=2)
    trainer = Trainer(make(), TinyLoader(), config, run_dir=tmp_path, on_epoch_end=lambda row: None,
                      console=Console(file=io.StringIO()))
    assert [type(c) for c in trainer_callbacks(trainer, tmp_path)] == [
        EarlyStopping, Checkpointing, MetricsLogger, ProgressDisplay, EpochHook]


def test_a_callback_stops_training_and_the_checkpoint_records_it(tmp_path):
    class StopAfterTwo(Callback):
        def on_epoch_end(self, run, row):
            run.should_stop = row["epoch"] == 2

    trainer = Trainer(make(), TinyLoader(), TrainConfig(**{**CFG, "epochs": 5}), run_dir=tmp_path,
                      callbacks=[StopAfterTwo()])
    assert len(trainer.fit()) == 2 and trainer.stopped_early
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_the_epoch_hook_stops_training_and_is_not_called_after_early_stopping():
    seen = []
    scores = iter([0.5, 0.4, 0.4, 0.4])
    config = TrainConfig(**{**CFG, "epochs": 4}, early_stopping_patience=2)
    trainer = Trainer(make(), TinyLoader(), config, evaluate=lambda m: {"accuracy": next(scores)},
                      on_epoch_end=lambda row: seen.append(row["epoch"]))
    assert len(trainer.fit()) == 3 and trainer.stopped_early
    assert seen == [1, 2]  # epoch 3 ended training by early stopping

    trainer = Trainer(make(), TinyLoader(), TrainConfig(**CFG), on_epoch_end=lambda row: row["epoch"] == 1)
    assert len(trainer.fit()) == 1 and trainer.stopped_early


class StepCounter(Callback):
    """Counts steps over a whole run, across a crash and a resume (its count is checkpointed)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, run):
        self.steps += 1

    def state_dict(self):
        return {"counted_steps": self.steps}

    def load_state_dict(self, checkpoint):
        self.steps = checkpoint.get("counted_steps", 0)


def test_callback_state_is_saved_with_the_checkpoint_and_restored_on_resume(tmp_path):
    first = StepCounter()
    with pytest.raises(Crash):  # epoch 1 is checkpointed, epoch 2 crashes before its first step
        Trainer(make(), TinyLoader(crash_at_epoch=1), TrainConfig(**CFG), run_dir=tmp_path, callbacks=[first]).fit()
    assert first.steps == STEPS and load_checkpoint(tmp_path / "checkpoint.pt")["counted_steps"] == STEPS
    resumed, recorder = StepCounter(), Recorder()
    Trainer(make(), TinyLoader(), TrainConfig(**CFG), run_dir=tmp_path, callbacks=[resumed, recorder]).fit(resume=True)
    assert resumed.steps == 3 * STEPS
    assert recorder.events[0] == ("start", 1)  # on_fit_start sees the restored start epoch


def test_fit_end_is_called_when_training_fails():
    recorder = Recorder()
    loader = TinyLoader()
    loader.x[5] = float("nan")
    with pytest.raises(DistillError, match="non-finite"):
        Trainer(make(), loader, TrainConfig(**CFG), callbacks=[recorder]).fit()
    assert recorder.events[-1] == ("end", "DistillError")


def test_global_callbacks_join_every_fit_until_removed():
    made = []

    def factory():
        made.append(Recorder())
        return made[-1]

    remove = add_global_callback(factory)
    try:
        Trainer(make(), TinyLoader(), TrainConfig(**{**CFG, "epochs": 1})).fit()
        Trainer(make(), TinyLoader(), TrainConfig(**{**CFG, "epochs": 1})).fit()
    finally:
        remove()
    assert len(made) == 2 and all(r.events[0] == ("start", 0) and r.events[-1] == ("end", None) for r in made)
    Trainer(make(), TinyLoader(), TrainConfig(**{**CFG, "epochs": 1})).fit()
    assert len(made) == 2


def test_callbacks_do_not_change_the_training():
    plain, observed = make(), make()
    Trainer(plain, TinyLoader(), TrainConfig(**CFG)).fit()
    Trainer(observed, TinyLoader(), TrainConfig(**CFG), callbacks=[Recorder(), StepCounter()]).fit()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), observed.state_dict().values()))


# ------------------------------------------------------------------------------ the progress display
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_progress_shows_time_remaining_and_keeps_its_counters_at_80_columns():
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True)
    torch.manual_seed(0)
    terms = [Term("cross_entropy_with_a_long_name", "ce", 0.5), Term("another_cross_entropy_term", "ce", 0.5)]
    distiller = Distiller(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), None, terms)
    distiller.dry_run(next(iter(TinyLoader())))
    config = TrainConfig(**{**CFG, "progress": True, "epochs": 2})
    Trainer(distiller, TinyLoader(), config, name="student-seed0-generation2",
            label="stage 12/40: student-seed0-generation2", console=console,
            evaluate=lambda m: {"accuracy": 0.5}).fit()
    lines = [ANSI.sub("", line) for line in re.split(r"[\r\n]", buffer.getvalue())]
    lines = [line for line in lines if line.strip()]
    assert lines
    for line in lines:
        assert len(line) <= 80, line
        # name (cut), bar, steps done of all, elapsed, remaining, then what fits of the information
        assert re.match(r"^stage 12/40: student-… [━╸╺ ]{16} \d/8 \d:\d\d:\d\d (\d:\d\d:\d\d|-:--:--)"
                        r"( *$| epoch \d/2 loss)", line), line
    assert lines[-1].startswith("stage 12/40: student-… ") and " 8/8 " in lines[-1] and lines[-1].endswith("…")


def test_describe_puts_the_loss_and_validation_metrics_first():
    assert describe(3, 10, {"hard": 0.5, "val_accuracy": 0.9, "loss": 1.25}) == (
        "epoch 3/10 loss 1.2500 val_accuracy 0.9000 hard 0.5000")


def test_a_redirected_log_gets_plain_lines_with_the_time_left(monkeypatch):
    """A log file (not a terminal) gets a dated line every PLAIN_EVERY seconds and at each epoch's
    end, not a live bar that only shows when the stage ends."""
    from distill.callbacks import ProgressDisplay

    monkeypatch.setattr(ProgressDisplay, "PLAIN_EVERY", 0.0)
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    torch.manual_seed(0)
    distiller = Distiller(nn.Sequential(nn.Linear(4, 3)), None, [Term("ce", "ce")])
    config = TrainConfig(**{**CFG, "progress": True, "epochs": 2})
    Trainer(distiller, TinyLoader(), config, name="baseline-seed0", console=console).fit()
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "baseline-seed0: 2 epochs of 4 steps"
    steps = [line for line in lines[1:] if re.match(r"^baseline-seed0: \d/8 steps, \d:\d\d:\d\d elapsed, "
                                                     r"(\d:\d\d:\d\d|\?) left; epoch \d/2 loss", line)]
    assert len(steps) == len(lines) - 1 >= 8 and "\x1b" not in buffer.getvalue()
    assert steps[-1].startswith("baseline-seed0: 8/8 steps") and " 0:00:00 left" in steps[-1]
