"""The training loop: devices, precision, accumulation, schedule, checkpoints, early stopping.

It trains any module whose ``forward(batch)`` returns an object with ``.loss`` (a scalar) and
``.terms`` (named scalars to log), such as :class:`distill.Distiller`. It knows no method by name.
Devices, mixed precision and data-parallel processes come from HF ``accelerate``: start the same
script with ``accelerate launch`` or ``torchrun`` to run on several processes.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.allocator import keep_freed_memory
from distill.checkpoints import fault_armed, fault_point, load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.logbook import MetricsLog
from distill.schedules import learning_rate
from distill.signals import move_batch

BatchTransform = Callable[[dict, torch.Generator], dict]
Evaluate = Callable[[nn.Module], dict[str, float]]

# The metrics' ``grad_norm`` is the mean total gradient norm (L2 over all parameters) over every
# GRAD_NORM_EVERY-th optimizer step of an epoch (the first included), or over every step when
# clipping, which computes it anyway. Reading every gradient costs about 0.7% of a small MLP's step
# on a CPU core; sampling one step in four makes it about 0.2%.
GRAD_NORM_EVERY = 4


@dataclass
class TrainConfig:
    """How to train; every field has a recipe twin in ``train:``."""

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"
    clip_grad_norm: float | None = None
    early_stopping_patience: int | None = None
    monitor: str = "val_accuracy"
    monitor_mode: str = "max"
    restore_best: bool = True
    checkpoint_every: int = 1
    seed: int = 0
    cpu: bool = False
    progress: bool = True
    tensorboard: bool = True  # event files under run_dir/tensorboard when tensorboard is installed


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


def make_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for ``config``; re-created when precision settings change."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = dict(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=use_cpu(config.cpu),
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # Another stage in this process used other precision settings: start the state afresh
        # (the process group, if any, is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(**kwargs)


def _seed_for(*parts: int) -> int:
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


class Trainer:
    """Fit a model on a batch loader, with checkpoints in ``run_dir`` (optional).

    Each epoch appends a row to ``run_dir/metrics.csv``: the epoch, the last learning rate, the mean
    of every loss term (``train_<name>``) and of the total (``train_loss``), ``grad_norm`` (see
    ``GRAD_NORM_EVERY``), the evaluation metrics (``val_<name>``) and ``epoch_seconds``. A
    non-finite loss, or a step that runs out of memory, stops training with a
    :class:`DistillError` that names the epoch and step and what to change.

    ``on_epoch_end(row)``, when given, is called with that row once the epoch is logged and
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
    ) -> None:
        self.model = model
        self.loader = train_loader
        self.config = config
        self.evaluate = evaluate
        self.run_dir = Path(run_dir) if run_dir else None
        self.name = name
        self.batch_transform = batch_transform
        self.console = console
        self.on_epoch_end = on_epoch_end
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    # ------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, float]]:
        """Train for ``config.epochs`` epochs (continuing from the last checkpoint if ``resume``)."""
        cfg = self.config
        accelerator = make_accelerator(cfg)
        optimizer = make_optimizer(self.model.parameters(), cfg)
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
        main = accelerator.is_main_process
        log = MetricsLog(
            self.run_dir / "metrics.csv" if (self.run_dir and main) else None,
            self.run_dir / "tensorboard" if (self.run_dir and main and cfg.tensorboard) else None,
        )
        start_epoch, best, stale, best_state = 0, None, 0, None
        unwrapped = accelerator.unwrap_model(model)
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            unwrapped.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_epoch = int(state["epoch"]) + 1
            best, stale = state.get("best"), int(state.get("stale", 0))
            best_state = state.get("best_state")
            log.restore(state.get("history", []))
        if start_epoch == 0:  # dropout and other in-model randomness; restored on resume
            torch.manual_seed(_seed_for(cfg.seed, 17))

        progress = _Progress(enabled=cfg.progress and main, console=self.console)
        stopped_early = False
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        set_progress = getattr(self.model, "set_progress", None)
        plain_step = _plain_optimizer(accelerator, optimizer)
        fault = fault_armed("epoch-step")  # tests: DISTILL_FAULT=epoch-step:[NAME:]E:S
        with progress:
            task = progress.add(f"{self.name}", total=(cfg.epochs - start_epoch) * steps)
            for epoch in range(start_epoch, cfg.epochs):
                started = time.perf_counter()
                self.loader.set_epoch(epoch)
                model.train()
                sums: dict[str, torch.Tensor] = {}
                count = 0
                grad_norms: list = []  # per sampled optimizer step: per-parameter norms, or the total
                updates = 0  # optimizer steps (accumulation windows) so far this epoch
                for step, batch in enumerate(self.loader):
                    lr = learning_rate(
                        cfg.lr, epoch + step / steps, cfg.epochs, cfg.schedule, cfg.warmup_epochs,
                        cfg.milestones, cfg.gamma,
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if set_progress is not None:  # a generic hook: e.g. term weights that warm up
                        set_progress(epoch + step / steps)
                    batch = move_batch(batch, accelerator.device)
                    if self.batch_transform is not None:
                        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, epoch, step, 5))
                        batch = self.batch_transform(batch, gen)
                    if cfg.grad_accum > 1:
                        # Accumulation windows restart with each epoch and its last step always
                        # updates (as with accelerate's own data loaders): no gradients are carried
                        # across an epoch's end, where the checkpoint is, so a resumed run takes the
                        # same steps as an uninterrupted one. accumulate() adds 1 to .step and
                        # syncs when it reaches a multiple of grad_accum.
                        accelerator.step = cfg.grad_accum - 1 if step + 1 == steps else step % cfg.grad_accum
                    try:
                        with accelerator.accumulate(model):
                            out = model(batch)
                            if not torch.isfinite(out.loss):
                                bad = [k for k, v in out.terms.items() if not torch.isfinite(v)]
                                raise DistillError(
                                    f"{self.name}: loss is {float(out.loss.detach())} at epoch {epoch + 1}, step "
                                    f"{step + 1} (non-finite terms: {', '.join(bad) or 'none; the sum overflowed'}); "
                                    "lower the learning rate, set train.clip_grad_norm, or check the inputs"
                                )
                            accelerator.backward(out.loss)
                            if accelerator.sync_gradients:
                                if cfg.clip_grad_norm:  # clipping computes the norm anyway: log every step
                                    grad_norms.append(accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm))
                                elif updates % GRAD_NORM_EVERY == 0:
                                    grad_norms.append(_grad_norms(accelerator, params))
                                updates += 1
                            if plain_step is None:
                                optimizer.step()
                                optimizer.zero_grad(set_to_none=True)
                            elif accelerator.sync_gradients:
                                plain_step.step()
                                plain_step.zero_grad(set_to_none=True)
                    except RuntimeError as exc:  # torch.OutOfMemoryError is one
                        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                            raise DistillError(self._out_of_memory(epoch, step, accelerator)) from None
                        raise
                    if fault:
                        fault_point("epoch-step", self.name, epoch + 1, step + 1)
                    for key, value in out.terms.items():
                        sums[key] = sums.get(key, 0.0) + value.detach().float()
                    sums["loss"] = sums.get("loss", 0.0) + out.loss.detach().float()
                    count += 1
                    if progress.enabled and (step % 10 == 0 or step == steps - 1):
                        running = "  ".join(f"{k} {float(v) / count:.4f}" for k, v in sums.items())
                        progress.update(task, step + 1 + (epoch - start_epoch) * steps,
                                        f"epoch {epoch + 1}/{cfg.epochs}  {running}")
                row: dict[str, float] = {"epoch": epoch + 1, "lr": lr}
                row.update({f"train_{k}": float(v) / count for k, v in sums.items()})
                if grad_norms:
                    row["grad_norm"] = _mean_norm(grad_norms, skip_overflow=accelerator.scaler is not None)
                if self.evaluate is not None:
                    metrics = self.evaluate(unwrapped)
                    row.update({f"val_{k}" if not k.startswith("val_") else k: v for k, v in metrics.items()})
                row["epoch_seconds"] = time.perf_counter() - started
                log.append(row)
                progress.update(task, (epoch + 1 - start_epoch) * steps, _describe(row, cfg.epochs))

                improved = False
                if cfg.early_stopping_patience is not None or (cfg.restore_best and self.evaluate):
                    current = row.get(cfg.monitor)
                    if current is None:
                        raise DistillError(
                            f"early stopping monitors '{cfg.monitor}', which is not among "
                            f"the logged metrics: {', '.join(row)}"
                        )
                    sign = 1 if cfg.monitor_mode == "max" else -1
                    if best is None or sign * current > sign * best:
                        best, stale, improved = current, 0, True
                        if cfg.restore_best:
                            best_state = copy.deepcopy(unwrapped.state_dict())
                    else:
                        stale += 1
                last = epoch + 1 == cfg.epochs or (
                    cfg.early_stopping_patience is not None and not improved
                    and stale >= cfg.early_stopping_patience
                )
                due = (epoch + 1) % cfg.checkpoint_every == 0 or last
                if self.checkpoint_path is not None and main and due:
                    save_checkpoint(
                        {
                            "model": unwrapped.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "epoch": epoch,
                            "rng": torch.get_rng_state(),
                            "best": best,
                            "stale": stale,
                            "best_state": best_state,
                            "history": log.rows,
                        },
                        self.checkpoint_path,
                    )
                accelerator.wait_for_everyone()
                if cfg.early_stopping_patience is not None and not improved and stale >= cfg.early_stopping_patience:
                    stopped_early = True
                    break
                if self.on_epoch_end is not None and self.on_epoch_end(dict(row)):
                    stopped_early = True
                    break
        if cfg.restore_best and best_state is not None:
            unwrapped.load_state_dict(best_state)
        log.close()
        self.history = log.rows
        self.stopped_early = stopped_early
        self.model = unwrapped
        return self.history

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


def _plain_optimizer(accelerator, optimizer) -> torch.optim.Optimizer | None:
    """The optimizer inside accelerate's wrapper, when stepping it directly is all the wrapper does.

    Without loss scaling, on a single process or with DDP, ``AcceleratedOptimizer.step`` and
    ``zero_grad`` only skip the call between accumulation steps; on the way they probe for optional
    packages and inspect signatures on every call (about 0.4 ms a step, 3% of a small MLP's step on
    a CPU core). The trainer then steps the inner optimizer itself, on ``sync_gradients``; any other
    set-up (fp16 scaling, DeepSpeed, XLA, Megatron) keeps the wrapper.
    """
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.scaler is not None or accelerator.distributed_type not in plain:
        return None
    return getattr(optimizer, "optimizer", None)


def _grad_norms(accelerator, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The L2 norm of each parameter's gradient (0-d tensors), unscaled.

    One fused call and no device sync per step: the total norm is taken once per epoch, in
    :func:`_mean_norm`, which keeps the trainer's per-step overhead small.
    """
    if accelerator.scaler is not None:  # fp16: gradients are still multiplied by the loss scale
        accelerator.unscale_gradients()
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


def _describe(row: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    for key, value in row.items():
        if key.startswith("train_") or key.startswith("val_"):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


class _Progress:
    """A rich progress bar that shows each loss term; a no-op when disabled."""

    def __init__(self, enabled: bool, console=None) -> None:
        self.enabled = enabled
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                transient=False,
            )

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def add(self, description: str, total: int):
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, info="")

    def update(self, task, completed: int, info: str) -> None:
        if self._progress is not None:
            self._progress.update(task, completed=completed, info=info)
