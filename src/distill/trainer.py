"""The training loop: devices, precision, accumulation, schedule, checkpoints, early stopping.

It trains any module whose ``forward(batch)`` returns an object with ``.loss`` (a scalar) and
``.terms`` (named scalars to log), such as :class:`distill.Distiller`. It knows no method by name.
Devices, mixed precision, data-parallel processes and sharding (FSDP) come from HF ``accelerate``:
start the same script with ``accelerate launch`` or ``torchrun`` to run on several processes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from distill.accelerate_compat import (end_window, fsdp_on_cpu, launcher_environment, plain_optimizer, prepare_state,
                                      reset_precision_state)
from distill.allocator import keep_freed_memory
from distill.callbacks import (Callback, CallbackList, Checkpointing, EarlyStopping, EpochHook, FitState,
                               MetricsLogger, ProgressDisplay, global_callbacks)
from distill.errors import DistillError
from distill.schedules import learning_rate
from distill.sharding import Unsharding, shard, total_grad_norm, whole
from distill.signals import move_batch
from distill.train_config import TrainConfig

BatchTransform = Callable[[dict, torch.Generator], dict]
Evaluate = Callable[[nn.Module], dict[str, float]]

# The metrics' ``grad_norm`` is the mean total gradient norm (L2 over all parameters) over every
# GRAD_NORM_EVERY-th optimizer step of an epoch (the first included), or over every step when
# clipping, which computes it anyway. Reading every gradient costs about 0.7% of a small MLP's step
# on a CPU core; sampling one step in four makes it about 0.2%.
GRAD_NORM_EVERY = 4


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    name = config.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise DistillError(f"unknown optimizer '{config.optimizer}'; choose sgd, adam or adamw")


def use_cpu(forced: bool = False) -> bool:
    """Train on the CPU when asked, or when several processes were launched on a machine without
    CUDA: accelerate then needs ``cpu=True`` to join them into one gloo process group."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return forced or (launched and not torch.cuda.is_available())


def distributed_state(cpu: bool = False):
    """accelerate's process state (rank, world size, main process), started consistently."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(cpu))


def shards(config: TrainConfig) -> bool:
    """Whether a fit with ``config`` shards the model (FSDP): ``config.sharding`` is ``fsdp`` (or the
    launcher asked for FSDP: ``accelerate launch --use_fsdp``) and several processes were launched.
    On one process there is nothing to shard across: the model trains whole."""
    asked = config.sharding == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if not asked or distributed_state(config.cpu).num_processes < 2:
        return False
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise DistillError(
            "train.sharding=fsdp and a DeepSpeed launch would both shard the student; "
            "launch without DeepSpeed, or set train.sharding=none"
        )
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        raise DistillError(f"train.sharding=fsdp needs torch >= 2.6 (FSDP2); this is torch {torch.__version__}")
    return True


def fsdp_plugin():
    """accelerate's FSDP2 settings for a sharded fit. distill picks the units itself
    (:func:`distill.sharding.shard_units`) and keeps the module tree as it is (no activation
    checkpointing wrappers, no loading on the meta device), so that the trained model can be handed
    back plain; the rest (``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_OFFLOAD_PARAMS``, ...) follows the
    launcher's environment, as in accelerate."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="no_wrap", activation_checkpointing=False,
        cpu_ram_efficient_loading=False,
    )


def make_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for ``config``; re-created when precision or sharding changes."""
    from accelerate import Accelerator

    kwargs = dict(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=use_cpu(config.cpu),
    )
    sharded = shards(config)
    if sharded:
        kwargs["fsdp_plugin"] = fsdp_plugin()
    prepare_state(sharded)
    with launcher_environment():  # an Accelerator given a plugin would set ACCELERATE_USE_FSDP for good
        try:
            accelerator = Accelerator(**kwargs)
        except ValueError:
            # Another stage in this process used other precision settings: start the state afresh
            # (the process group, if any, is kept).
            reset_precision_state()
            accelerator = Accelerator(**kwargs)
    if sharded:
        fsdp_on_cpu(accelerator, kwargs["fsdp_plugin"])
    return accelerator


def memory_format(model: nn.Module, fmt: torch.memory_format) -> None:
    """Put ``model``'s 4-D parameters and buffers (conv weights) in ``fmt``, in place (``train.channels_last``:
    ``torch.channels_last`` for the fit, ``torch.contiguous_format`` after it; other ranks are left as they are)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=fmt)


def _seed_for(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


class EpochStats:
    """The running sums of one epoch: each loss term and the total, the sampled gradient norms."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # steps
        self.updates = 0  # optimizer steps (accumulation windows)
        self.grad_norms: list = []  # per sampled optimizer step: per-parameter norms, or the total
        self.lr = math.nan  # of the last step

    def add(self, out) -> None:
        for key, value in out.terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.sums["loss"] = self.sums.get("loss", 0.0) + out.loss.detach().float()
        self.count += 1

    def means(self) -> dict[str, float]:
        """The mean of each term and of the loss so far (reads them from the device)."""
        return {key: float(value) / self.count for key, value in self.sums.items()}


class Trainer:
    """Fit a model on a batch loader, with checkpoints in ``run_dir`` (optional).

    Each epoch appends a row to ``run_dir/metrics.csv``: the epoch, the last learning rate, the mean
    of every loss term (``train_<name>``) and of the total (``train_loss``), ``grad_norm`` (see
    ``GRAD_NORM_EVERY``), the evaluation metrics (``val_<name>``) and ``epoch_seconds``. A
    non-finite loss, or a step that runs out of memory, stops training with a
    :class:`DistillError` that names the epoch and step and what to change.

    With ``config.grad_accum`` = N, the optimizer steps once per window of N steps; windows restart
    with each epoch and an epoch's last step always ends one (as with accelerate's own data
    loaders), so no gradient is carried past an epoch's end, where the checkpoint is, and a resumed
    run takes the same steps as an uninterrupted one.

    With ``config.sharding = "fsdp"`` on several processes, the model is sharded (FSDP2) for the fit
    and handed back whole and plain at its end (:mod:`distill.sharding`); a teacher held outside
    the model's module tree, as :class:`distill.Distiller` holds it, is not sharded.

    Early stopping (``config.early_stopping_patience``) and ``config.restore_best`` follow
    ``config.monitored()``: ``config.monitor``, else ``val_accuracy`` (set ``monitor`` to the
    task's own metric, e.g. ``val_ndcg10``).

    Checkpoints, early stopping, the metrics log, the progress display and ``on_epoch_end`` are
    callbacks (:mod:`distill.callbacks`); ``callbacks`` adds more, after the trainer's own.
    ``on_epoch_end(row)``, when given, is called with each epoch's row once it is logged and
    checkpointed; returning True stops training there, as early stopping does (a hyperparameter
    search uses it to report each epoch's validation accuracy and stop a pruned trial). With several
    processes, every one must return the same.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        config: TrainConfig,
        *,
        evaluate: Evaluate | None = None,
        run_dir: str | Path | None = None,
        name: str = "train",
        batch_transform: BatchTransform | None = None,
        console=None,
        on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None,
        callbacks: Sequence[Callback] = (),
        label: str | None = None,
    ) -> None:
        self.model = model
        self.label = label or name  # what the progress display calls the fit (e.g. "stage 3/7: student-seed0")
        self.loader = train_loader
        self.config = config
        self.evaluate = evaluate
        self.run_dir = Path(run_dir) if run_dir else None
        self.name = name
        self.batch_transform = batch_transform
        self.console = console
        self.on_epoch_end = on_epoch_end
        self.callbacks = list(callbacks)
        self.history: list[dict[str, float]] = []
        self.stopped_early = False

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    # ------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, float]]:
        """Train for ``config.epochs`` epochs (continuing from the last checkpoint if ``resume``)."""
        try:
            run = self._start(resume)
        except BaseException:
            if self.config.channels_last:  # a fit that could not start leaves the model as it came
                memory_format(self.model, torch.contiguous_format)
            raise
        try:
            run.callbacks.on_fit_start(run)  # a resumed fit: state restored, start_epoch set
            if run.start_epoch == 0:  # dropout and other in-model randomness; restored on resume
                torch.manual_seed(_seed_for(self.config.seed, 17))
            for epoch in range(run.start_epoch, self.config.epochs):
                run.epoch = epoch
                row = self._train_epoch(run)
                run.history.append(row)
                run.callbacks.on_epoch_end(run, dict(row))
                if run.should_stop:
                    break
        except BaseException as exc:
            run.error = exc
            raise
        finally:
            run.callbacks.on_fit_end(run)
            if run.unsharding is not None and run.error is None:
                run.unwrapped = run.unsharding.restore()  # the model back as it came: whole, plain
            if self.config.channels_last:
                memory_format(run.unwrapped, torch.contiguous_format)
        self.history, self.stopped_early, self.model = run.history, run.should_stop, run.unwrapped
        return self.history

    def _start(self, resume: bool) -> FitState:
        """The accelerator, the prepared model and optimizer, the loader's shard, the callbacks."""
        accelerator = make_accelerator(self.config)
        unsharding = None
        if accelerator.is_fsdp2:  # sharded before the optimizer is made; accelerate leaves the model as it is
            unsharding = Unsharding(self.model)
            plugin = accelerator.state.fsdp_plugin
            shard(self.model, reshard_after_forward=plugin.reshard_after_forward,
                  mp_policy=plugin.mixed_precision_policy, offload_policy=plugin.cpu_offload)
        if self.config.channels_last:
            memory_format(self.model, torch.channels_last)  # in place, before the optimizer
        optimizer = make_optimizer(self.model.parameters(), self.config)
        model, optimizer = accelerator.prepare(self.model, optimizer)
        if accelerator.device.type == "cpu":
            keep_freed_memory()  # no page faults for every step's activations (see distill.allocator)
        if hasattr(self.loader, "rank"):
            self.loader.rank = accelerator.process_index
            self.loader.world_size = accelerator.num_processes
        steps = len(self.loader)
        if steps == 0:
            raise DistillError(
                "the training loader yields no batch: the batch size is larger than the data set"
            )
        run = FitState(self, accelerator, model, accelerator.unwrap_model(model), optimizer, steps, resume)
        run.unsharding = unsharding
        run.callbacks = CallbackList([*self._own_callbacks(run), *self.callbacks, *global_callbacks()])
        return run

    def _own_callbacks(self, run: FitState) -> list[Callback]:
        cfg, own = self.config, []
        if cfg.early_stopping_patience is not None or (cfg.restore_best and self.evaluate is not None):
            own.append(EarlyStopping(cfg.monitored(), cfg.monitor_mode, cfg.early_stopping_patience, cfg.restore_best))
        if self.run_dir is not None:
            own.append(Checkpointing(self.checkpoint_path, cfg.checkpoint_every))
            own.append(MetricsLogger(self.run_dir, cfg.tensorboard))
        if cfg.progress and run.main:
            own.append(ProgressDisplay(self.console))
        if self.on_epoch_end is not None:
            own.append(EpochHook(self.on_epoch_end))
        return own

    def _train_epoch(self, run: FitState) -> dict[str, float]:
        """One epoch of steps, then its metrics row."""
        started = time.perf_counter()
        self.loader.set_epoch(run.epoch)
        run.model.train()
        run.stats = stats = EpochStats()
        step = _Step(self, run)
        for index, batch in enumerate(self.loader):
            run.step = index
            stats.add(step(batch))
            run.callbacks.on_step_end(run)
        row: dict[str, float] = {"epoch": run.epoch + 1, "lr": stats.lr}
        row.update({f"train_{k}": v for k, v in stats.means().items()})
        if stats.grad_norms:
            row["grad_norm"] = _mean_norm(stats.grad_norms, skip_overflow=run.accelerator.scaler is not None)
        if self.evaluate is not None:
            metrics = self.evaluate(run.unwrapped)
            row.update({f"val_{k}" if not k.startswith("val_") else k: v for k, v in metrics.items()})
        row["epoch_seconds"] = time.perf_counter() - started
        return row

    def _out_of_memory(self, epoch: int, step: int, accelerator) -> str:
        """What to do when a training step ran out of memory, in one line."""
        cfg = self.config
        batch = getattr(self.loader, "batch_size", None)
        smaller = (
            f" (e.g. train.batch_size={max(1, batch // 2)} with train.grad_accum={2 * cfg.grad_accum})"
            if isinstance(batch, int) and batch > 1 else ""
        )
        return (
            f"{self.name}: out of memory on {accelerator.device} at epoch {epoch + 1}, step {step + 1}"
            f"{f' (batch size {batch})' if batch else ''}; options: a smaller train.batch_size with "
            f"train.grad_accum to keep the global batch{smaller}; a cached teacher (teacher.cache: auto) "
            "so the teacher does not run during training; lower precision (train.mixed_precision=bf16, "
            "teacher.precision=bf16)"
        )


class _Step:
    """One training step of an epoch: learning rate, batch, forward, backward and, at the end of an
    accumulation window, the optimizer step (with the gradient norm sampled before it)."""

    def __init__(self, trainer: Trainer, run: FitState) -> None:
        self.trainer, self.run, self.cfg = trainer, run, trainer.config
        self.accelerator = run.accelerator
        self.window = self.accelerator.gradient_accumulation_steps  # config.grad_accum, or the launcher's
        self.stepper = plain_optimizer(self.accelerator, run.optimizer) or run.optimizer
        self.params = [p for p in run.unwrapped.parameters() if p.requires_grad]
        self.set_progress = getattr(trainer.model, "set_progress", None)  # e.g. term weights that warm up

    def __call__(self, batch):
        cfg, run, accelerator = self.cfg, self.run, self.accelerator
        epoch, step, steps = run.epoch, run.step, run.steps
        run.stats.lr = lr = learning_rate(
            cfg.lr, epoch + step / steps, cfg.epochs, cfg.schedule, cfg.warmup_epochs, cfg.milestones, cfg.gamma,
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if self.set_progress is not None:
            self.set_progress(epoch + step / steps)
        batch = move_batch(batch, accelerator.device)
        if cfg.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last)
                     if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() else v
                     for k, v in batch.items()}
        if self.trainer.batch_transform is not None:
            gen = torch.Generator().manual_seed(_seed_for(cfg.seed, epoch, step, 5))
            batch = self.trainer.batch_transform(batch, gen)
        sync = (step + 1) % self.window == 0 or step + 1 == steps  # windows restart with each epoch
        end_window(accelerator, sync)
        try:
            with nullcontext() if sync else accelerator.no_sync(run.model):  # DDP: no all-reduce inside a window
                out = run.model(batch)
                if not torch.isfinite(out.loss):
                    bad = [k for k, v in out.terms.items() if not torch.isfinite(v)]
                    raise DistillError(
                        f"{run.name}: loss is {float(out.loss.detach())} at epoch {epoch + 1}, step "
                        f"{step + 1} (non-finite terms: {', '.join(bad) or 'none; the sum overflowed'}); "
                        "lower the learning rate, set train.clip_grad_norm, or check the inputs"
                    )
                accelerator.backward(out.loss)  # divides the loss by the window length
            if sync:
                self._sample_grad_norm()
                self.stepper.step()
                self.stepper.zero_grad(set_to_none=True)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                raise DistillError(self.trainer._out_of_memory(epoch, step, accelerator)) from None
            raise
        return out

    def _sample_grad_norm(self) -> None:
        stats, accelerator, clip = self.run.stats, self.accelerator, self.cfg.clip_grad_norm
        if clip:  # clipping computes the norm anyway: log every step
            stats.grad_norms.append(whole(accelerator.clip_grad_norm_(self.run.model.parameters(), clip)))
        elif stats.updates % GRAD_NORM_EVERY == 0:
            stats.grad_norms.append(_grad_norms(accelerator, self.params, sharded=self.run.unsharding is not None))
        stats.updates += 1


def _grad_norms(accelerator, params: list[torch.Tensor], sharded: bool = False):
    """The L2 norm of each parameter's gradient (0-d tensors), unscaled.

    One fused call and no device sync per step: the total norm is taken once per epoch, in
    :func:`_mean_norm`, which keeps the trainer's per-step overhead small. A sharded model's
    processes each hold a shard of every gradient: they take the total norm together (0-d tensor).
    """
    if accelerator.scaler is not None:  # fp16: gradients are still multiplied by the loss scale
        accelerator.unscale_gradients()
    if sharded:
        return total_grad_norm(params)
    return tuple(torch._foreach_norm([p.grad for p in params if p.grad is not None]))


def _mean_norm(norms: list, skip_overflow: bool) -> float:
    """The mean over optimizer steps of the total gradient norm (L2 over all parameters).

    ``norms`` holds one entry per step: a tuple of per-parameter norms (from :func:`_grad_norms`)
    or the total norm (from clipping). With fp16 loss scaling, steps whose gradients overflowed
    were skipped by the optimizer and are left out here too.
    """
    norms = [n for n in norms if n is not None and not (isinstance(n, tuple) and not n)]  # steps with gradients
    if not norms:
        return float("nan")
    sizes = {len(n) if isinstance(n, tuple) else 0 for n in norms}
    if len(sizes) == 1 and 0 not in sizes:  # the usual case: one stack for the epoch
        parts = torch.stack([t for n in norms for t in n]).float().view(len(norms), -1)
        totals = torch.linalg.vector_norm(parts, dim=1)
    else:  # clipping, or a parameter without a gradient at some steps
        totals = torch.stack([
            torch.linalg.vector_norm(torch.stack(n).float()) if isinstance(n, tuple) else torch.as_tensor(n).float()
            for n in norms
        ])
    if skip_overflow:
        totals = totals[torch.isfinite(totals)]
    return float(totals.mean()) if len(totals) else float("nan")
