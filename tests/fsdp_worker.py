"""Trains a tiny distillation (a student, a live frozen teacher, KD) with ``train.sharding=fsdp`` and
saves the student's weights; run by ``tests/test_fsdp.py`` and ``benchmarks/fsdp_equality.py``
under ``torchrun`` (2 CPU processes, gloo), and as one process for the reference.

    python tests/fsdp_worker.py OUT_DIR PROCESSES [EPOCHS]

In one launch, into ``OUT_DIR``:

1. ``full.safetensors``: a fit of EPOCHS epochs (8 steps each, windows of 2 accumulated steps); a
   callback records at every step the share of the model's parameters this process holds, and that
   the teacher is whole (not sharded);
2. ``resumed.safetensors``: the same fit stopped after EPOCHS - 1 epochs, then resumed from its
   checkpoint for the last one, on the same model object (handed back plain, then sharded again);
   ``stopped.pt`` is the checkpoint it stopped at;
3. then a fit without sharding, which must be plain data parallel (DDP) again;

and ``rank<R>.json`` per process: what the callback saw (``held``: the smallest and largest share
over the steps) and the checks after each fit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from distill import Distiller, Term, TrainConfig, Trainer
from distill.callbacks import Callback
from distill.data import ArrayDataset, BatchLoader
from distill.trainer import distributed_state

STEPS_PER_EPOCH = 8


class ShardWatch(Callback):
    """At every step: the share of the trained model's parameters (elements) this process holds,
    whether every one of them is sharded, and whether the teacher's are all whole."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.teacher, self.held, self.all_sharded, self.teacher_whole, self.kind = teacher, [], True, True, None

    def on_step_end(self, run) -> None:
        from torch.distributed.tensor import DTensor

        params = list(run.model.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        self.held.append(local / sum(p.numel() for p in params))
        self.all_sharded &= all(isinstance(p, DTensor) for p in params)
        self.teacher_whole &= not any(isinstance(p, DTensor) for p in self.teacher.parameters())
        self.kind = str(run.accelerator.distributed_type)


def build():
    """The data, the loader, the teacher and the distiller, the same on every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    loader = BatchLoader(ArrayDataset(x, y), 32, shuffle=True, seed=3, drop_last=True,
                         augment={"crop_padding": 1, "flip": True})
    distiller = Distiller(student, teacher, [Term("hard", "ce", 0.5), Term("soft", "kd", 0.5),
                                             Term("hint", "hint", student="2", teacher="2")])
    distiller.dry_run(next(iter(loader)))  # makes the hint's adapter
    return loader, teacher, distiller


def config(epochs: int, sharding: str = "fsdp", **kw) -> TrainConfig:
    # windows of 2 steps: the gradients of a window's first step are kept sharded, unsynchronised
    return TrainConfig(epochs=epochs, optimizer="sgd", lr=0.1, grad_accum=2, progress=False, tensorboard=False,
                       sharding=sharding, **kw)


def plain(distiller: Distiller, keys: list[str]) -> bool:
    """Whether a model after a sharded fit is as it came: its own classes, plain parameters, no
    hooks left by FSDP, the same state dict keys."""
    from torch.distributed.tensor import DTensor

    return (type(distiller) is Distiller and type(distiller.student) is torch.nn.Sequential
            and not any(isinstance(p, DTensor) for p in distiller.parameters())
            and not any(m._forward_pre_hooks or m._forward_hooks for m in distiller.modules())
            and list(distiller.state_dict()) == keys)


def main(out: str | Path, processes: int, epochs: int = 3) -> dict:
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = distributed_state()
    assert state.num_processes == processes, (state.num_processes, processes)
    report: dict = {}

    # 1. a sharded fit
    loader, teacher, distiller = build()
    keys = list(distiller.state_dict())
    watch = ShardWatch(teacher)
    history = Trainer(distiller, loader, config(epochs), callbacks=[watch]).fit()
    assert loader.world_size == processes  # each process really held a shard of every batch
    report.update(held=[min(watch.held), max(watch.held)], all_sharded=watch.all_sharded,
                  loss=history[-1]["train_loss"], grad_norm=history[-1]["grad_norm"],
                  teacher_whole=watch.teacher_whole, kind=watch.kind, steps=len(watch.held),
                  plain_after_fit=plain(distiller, keys))
    with torch.no_grad():  # one process alone: a model still sharded would wait for the other
        report["student_runs_alone"] = bool(torch.isfinite(distiller.student(torch.randn(2, 1, 8, 8))).all())
    if state.is_main_process:
        save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, out / "full.safetensors")

    # 2. stopped after epochs - 1, resumed from the checkpoint on the same (handed back) model
    if epochs > 1:
        run_dir = out / "run"
        loader, teacher, distiller = build()
        Trainer(distiller, loader, config(epochs), run_dir=run_dir,
                on_epoch_end=lambda row: row["epoch"] == epochs - 1).fit()
        if state.is_main_process:  # for a resume on another number of processes
            shutil.copy(run_dir / "checkpoint.pt", out / "stopped.pt")
        Trainer(distiller, loader, config(epochs), run_dir=run_dir).fit(resume=True)
        report["plain_after_resume"] = plain(distiller, keys)
        if state.is_main_process:
            save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, out / "resumed.safetensors")

    # 3. unsharded again
    loader, teacher, distiller = build()
    watch = ShardWatch(teacher)
    Trainer(distiller, loader, config(1, sharding="none"), callbacks=[watch]).fit()
    report["kind_after"] = watch.kind
    report["sharded_after"] = watch.held[0] < 1

    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    state.wait_for_everyone()
    return report


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
