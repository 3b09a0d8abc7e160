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

from distill.checkpoints import load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.logbook import MetricsLog
from distill.schedules import learning_rate
from distill.signals import move_batch

BatchTransform = Callable[[dict, torch.Generator], dict]
Evaluate = Callable[[nn.Module], dict[str, float]]


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
    """Fit a model on a batch loader, with checkpoints in ``run_dir`` (optional)."""

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
    ) -> None:
        self.model = model
        self.loader = train_loader
        self.config = config
        self.evaluate = evaluate
        self.run_dir = Path(run_dir) if run_dir else None
        self.name = name
        self.batch_transform = batch_transform
        self.console = console
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
        with progress:
            task = progress.add(f"{self.name}", total=(cfg.epochs - start_epoch) * steps)
            for epoch in range(start_epoch, cfg.epochs):
                started = time.perf_counter()
                self.loader.set_epoch(epoch)
                model.train()
                sums: dict[str, torch.Tensor] = {}
                count = 0
                grad_norm = None
                for step, batch in enumerate(self.loader):
                    lr = learning_rate(
                        cfg.lr, epoch + step / steps, cfg.epochs, cfg.schedule, cfg.warmup_epochs,
                        cfg.milestones, cfg.gamma,
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batch = move_batch(batch, accelerator.device)
                    if self.batch_transform is not None:
                        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, epoch, step, 5))
                        batch = self.batch_transform(batch, gen)
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
                        if cfg.clip_grad_norm and accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
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
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
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
        if cfg.restore_best and best_state is not None:
            unwrapped.load_state_dict(best_state)
        log.close()
        self.history = log.rows
        self.stopped_early = stopped_early
        self.model = unwrapped
        return self.history


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
