"""Trainer callbacks: everything around :class:`distill.Trainer`'s loop that is not a training step.

``Trainer.fit`` trains epochs of steps and calls these hooks of each callback, in order:

- ``on_fit_start(run)``: once, before the first epoch (of a resumed fit: the first one left);
- ``on_step_end(run)``: after each step (``run.epoch``, ``run.step``, ``run.stats``);
- ``on_epoch_end(run, row)``: after each epoch, with its metrics row (see :class:`distill.Trainer`);
- ``on_fit_end(run)``: once at the end, also when training raised (``run.error`` is then set).

``run`` is the :class:`FitState`. A hook ends training after the current epoch by setting
``run.should_stop``. A callback with state that must survive a crash returns it from
``state_dict()`` (tensors, numbers, strings, lists and dicts, under keys unique to it): it is saved
with every checkpoint and handed to ``load_state_dict(checkpoint)`` when a fit resumes.
``on_fit_start`` hooks must not draw from torch's random number generator (a resumed fit has just
restored it).

The trainer builds its own callbacks for each fit, in this order, and appends the ones given to it
(``Trainer(callbacks=[...])``), then those added to every fit of the process
(:func:`add_global_callback`):

1. :class:`EarlyStopping` when the config sets ``early_stopping_patience``, or ``restore_best``
   with an ``evaluate`` function;
2. :class:`Checkpointing` when the trainer has a ``run_dir``;
3. :class:`MetricsLogger` when the trainer has a ``run_dir``;
4. :class:`ProgressDisplay` when ``config.progress`` (main process only);
5. :class:`EpochHook` for the trainer's ``on_epoch_end`` function.

The order matters twice: ``Checkpointing.on_fit_start`` restores the state of a resumed fit (start
epoch, history, other callbacks' state) before the later callbacks start; and
``EarlyStopping.on_epoch_end`` decides before ``Checkpointing.on_epoch_end`` saves, so the
checkpoint records the decision and is always written for the last epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.checkpoints import load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.logbook import MetricsLog
from distill.sharding import load_model_state, load_optimizer_state, model_state, optimizer_state


HOOKS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_fit_end")


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_fit_start(self, run: FitState) -> None:
        pass

    def on_step_end(self, run: FitState) -> None:
        pass

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        pass

    def on_fit_end(self, run: FitState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        pass


@dataclass
class FitState:
    """What callbacks see of a running fit."""

    trainer: Any  # the distill.Trainer that runs the fit (callbacks sit below the trainer: no import)
    accelerator: Any
    model: torch.nn.Module  # as prepared by accelerate (e.g. wrapped for DDP): the one that trains
    unwrapped: torch.nn.Module  # the trainer's model itself
    optimizer: Any  # as prepared by accelerate
    steps: int  # batches per epoch
    resume: bool = False
    start_epoch: int = 0  # 0-based: the first epoch this fit trains
    epoch: int = 0  # 0-based: the epoch being trained
    step: int = 0  # 0-based: the step of the epoch just taken
    stats: Any = None  # the running sums of this epoch (distill.trainer.EpochStats)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch
    should_stop: bool = False
    error: BaseException | None = None
    callbacks: CallbackList | None = None
    unsharding: Any = None  # a sharded fit (FSDP): how to hand the model back (distill.sharding.Unsharding)

    @property
    def name(self) -> str:
        return self.trainer.name

    @property
    def label(self) -> str:
        """What the progress display shows for this fit (the name, with the run's stage counter)."""
        return getattr(self.trainer, "label", None) or self.trainer.name

    @property
    def config(self):
        return self.trainer.config

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


class CallbackList:
    """Callbacks in order; calling a hook calls it on those that define it."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)
        # only the overridden hooks: on_step_end runs every step and most callbacks ignore it
        self._hooks = {
            hook: [getattr(c, hook) for c in self.callbacks
                   if getattr(type(c), hook, None) is not getattr(Callback, hook)]
            for hook in HOOKS
        }

    def __iter__(self):
        return iter(self.callbacks)

    def on_fit_start(self, run: FitState) -> None:
        for hook in self._hooks["on_fit_start"]:
            hook(run)

    def on_step_end(self, run: FitState) -> None:
        for hook in self._hooks["on_step_end"]:
            hook(run)

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        for hook in self._hooks["on_epoch_end"]:
            hook(run, row)

    def on_fit_end(self, run: FitState) -> None:
        for hook in self._hooks["on_fit_end"]:
            hook(run)


# ------------------------------------------------------------------------------ callbacks of every fit
_GLOBAL: list[Callable[[], Callback]] = []


def add_global_callback(factory: Callable[[], Callback]) -> Callable[[], None]:
    """Give every fit in this process, from now on, a callback made by ``factory()`` (after the
    trainer's own and the ones given to it); returns a function that removes it again.

    For instrumenting runs whose trainers are built elsewhere, such as ``distill run``'s stages.
    distill adds none itself; ``tests/fault_injection.py`` adds its fault injector this way.
    """
    _GLOBAL.append(factory)

    def remove() -> None:
        if factory in _GLOBAL:
            _GLOBAL.remove(factory)

    return remove


def global_callbacks() -> list[Callback]:
    """Fresh callbacks from the factories of :func:`add_global_callback`, in the order added."""
    return [factory() for factory in _GLOBAL]


# ------------------------------------------------------------------------------ the trainer's own
class EarlyStopping(Callback):
    """Follows the validation metric ``monitor`` (``mode`` "max" or "min"): ends training after
    ``patience`` epochs without improvement (when ``patience`` is set), and ends the fit with the
    weights of the best epoch (when ``restore_best``)."""

    def __init__(self, monitor: str, mode: str = "max", patience: int | None = None,
                 restore_best: bool = False) -> None:
        self.monitor, self.sign = monitor, 1 if mode == "max" else -1
        self.patience, self.restore_best = patience, restore_best
        self.best: float | None = None
        self.stale = 0  # epochs since the best one
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        current = row.get(self.monitor)
        if current is None:
            raise DistillError(
                f"early stopping monitors '{self.monitor}', which is not among "
                f"the logged metrics: {', '.join(row)}"
            )
        if self.best is None or self.sign * current > self.sign * self.best:
            self.best, self.stale = current, 0
            if self.restore_best:  # a sharded model's is gathered on the main process (all take part)
                self.best_state = copy.deepcopy(model_state(run.unwrapped))
        else:
            self.stale += 1
            if self.patience is not None and self.stale >= self.patience:
                run.should_stop = True

    def on_fit_end(self, run: FitState) -> None:
        if run.error is None and self.restore_best and self.best_state is not None:
            load_model_state(run.unwrapped, self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "best_state": self.best_state}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.best, self.stale = checkpoint.get("best"), int(checkpoint.get("stale", 0))
        self.best_state = checkpoint.get("best_state")


class Checkpointing(Callback):
    """Saves the training state to ``path`` every ``every`` epochs and after the last one (the
    main process writes, then every process waits for it); a resumed fit continues from it.

    The state: the model's and the optimizer's, the 0-based epoch, torch's RNG state, the history
    of metrics rows, and every callback's ``state_dict()``. A sharded model's (FSDP) is gathered
    whole on the main process, its optimizer's keyed by parameter name
    (:mod:`distill.sharding`): the checkpoint resumes on any number of processes, sharded or not.
    """

    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path, self.every = Path(path), every

    def on_fit_start(self, run: FitState) -> None:
        if not (run.resume and self.path.exists()):
            return
        state = load_checkpoint(self.path)
        load_model_state(run.unwrapped, state["model"])
        load_optimizer_state(run.unwrapped, run.optimizer, state["optimizer"])
        torch.set_rng_state(state["rng"])
        run.start_epoch = int(state["epoch"]) + 1
        run.history = [dict(r) for r in state.get("history", [])]
        for callback in run.callbacks or ():
            callback.load_state_dict(state)

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        last = run.epoch + 1 == run.config.epochs or run.should_stop
        due = (run.epoch + 1) % self.every == 0 or last
        if due and run.unsharding is not None:  # every process sends its shards to the main one
            model, optimizer = model_state(run.unwrapped), optimizer_state(run.unwrapped, run.optimizer)
        elif due and run.main:
            model, optimizer = run.unwrapped.state_dict(), run.optimizer.state_dict()
        if due and run.main:
            state = {"model": model, "optimizer": optimizer, "epoch": run.epoch, "rng": torch.get_rng_state()}
            for callback in run.callbacks or ():
                state.update(callback.state_dict())
            state["history"] = run.history
            save_checkpoint(state, self.path)
        run.accelerator.wait_for_everyone()


class MetricsLogger(Callback):
    """Each epoch's row to ``run_dir/metrics.csv``, and to TensorBoard event files under
    ``run_dir/tensorboard`` when ``tensorboard`` and it is installed (main process only)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir, self.tensorboard = Path(run_dir), tensorboard
        self.log: MetricsLog | None = None

    def on_fit_start(self, run: FitState) -> None:
        folder = self.run_dir if run.main else None
        self.log = MetricsLog(
            folder / "metrics.csv" if folder else None,
            folder / "tensorboard" if folder and self.tensorboard else None,
        )
        self.log.restore(run.history)  # a resumed fit: its file is rewritten with the next row

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        self.log.append(row)

    def on_fit_end(self, run: FitState) -> None:
        if self.log is not None:
            self.log.close()


class EpochHook(Callback):
    """Calls ``fn(row)`` after each epoch, once it is logged and checkpointed; ``fn`` returning
    True ends training there. Not called for an epoch on which another callback (early stopping)
    already ended training."""

    def __init__(self, fn: Callable[[dict[str, float]], bool | None]) -> None:
        self.fn = fn

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        if not run.should_stop and self.fn(dict(row)):
            run.should_stop = True


class ProgressDisplay(Callback):
    """A rich progress bar over the fit's steps: the trainer's name, the bar, steps done of all,
    time elapsed and remaining, then information: the running mean of the loss and of each term
    (every 10 steps), and each epoch's metrics once it ends.

    The name (at most 22 characters: the run's stage counter and the stage), the bar and the counters keep their width; the information
    takes what is left of the line and is cut with an ellipsis, so an 80-column terminal shows one
    stable line whatever the number of terms.
    """

    EVERY = 10  # steps between updates of the running means (each reads them from the device)
    PLAIN_EVERY = 30.0  # seconds between plain lines when the output is a log file, not a terminal

    def __init__(self, console=None) -> None:
        self.console = console
        self._progress = None
        self._task = None
        self._plain = False
        self._last_line = 0.0

    def on_fit_start(self, run: FitState) -> None:
        import time

        from rich.console import Console

        console = self.console or Console()
        self._plain = not console.is_terminal  # a redirected log gets a dated line now and then
        self._last_line = time.monotonic()
        self._start = self._last_line
        if self._plain:
            self.console = console
            self._total = (run.config.epochs - run.start_epoch) * run.steps
            console.print(f"{run.label}: {run.config.epochs - run.start_epoch} epochs of {run.steps} steps", markup=False)
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.table import Column

        self._progress = Progress(
            TextColumn("[bold]{task.description}",
                       table_column=Column(no_wrap=True, overflow="ellipsis", max_width=22)),
            BarColumn(bar_width=16),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console, transient=False, expand=True,
        )
        self._progress.start()
        total = (run.config.epochs - run.start_epoch) * run.steps
        self._task = self._progress.add_task(run.label, total=total, info="")

    def _line(self, run: FitState, done: int, info: str) -> None:
        import time

        now = time.monotonic()
        self._last_line = now
        elapsed = now - self._start
        eta = elapsed / done * (self._total - done) if done else float("nan")
        self.console.print(f"{run.label}: {done}/{self._total} steps, {_clock(elapsed)} elapsed, "
                           f"{_clock(eta)} left; {info}", markup=False)

    def on_step_end(self, run: FitState) -> None:
        if self._plain:
            import time

            if time.monotonic() - self._last_line >= self.PLAIN_EVERY:
                done = run.step + 1 + (run.epoch - run.start_epoch) * run.steps
                self._line(run, done, describe(run.epoch + 1, run.config.epochs, run.stats.means()))
            return
        if run.step % self.EVERY == 0 or run.step == run.steps - 1:
            done = run.step + 1 + (run.epoch - run.start_epoch) * run.steps
            info = describe(run.epoch + 1, run.config.epochs, run.stats.means())
            self._progress.update(self._task, completed=done, info=info)

    def on_epoch_end(self, run: FitState, row: dict[str, float]) -> None:
        values = {k.removeprefix("train_"): v for k, v in row.items() if k.startswith(("train_", "val_"))}
        done = (run.epoch + 1 - run.start_epoch) * run.steps
        if self._plain:
            self._line(run, done, describe(int(row["epoch"]), run.config.epochs, values))
            return
        self._progress.update(self._task, completed=done, info=describe(int(row["epoch"]), run.config.epochs, values))

    def on_fit_end(self, run: FitState) -> None:
        if self._progress is not None:
            self._progress.stop()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def describe(epoch: int, epochs: int, values: dict[str, float]) -> str:
    """``epoch 3/10 loss 0.4567 val_accuracy 0.9120 hard 0.1234 ...``: the loss, then validation
    metrics, then the loss terms (what is cut first on a narrow line comes last)."""
    order = sorted(values, key=lambda k: (k != "loss", not k.startswith("val_")))
    return " ".join([f"epoch {epoch}/{epochs}"] + [f"{k} {values[k]:.4f}" for k in order])
