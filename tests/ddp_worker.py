"""Trains a tiny distiller with the Trainer and saves the student's weights; run by test_ddp.py
under `accelerate launch` / `torchrun` (2 CPU processes, gloo) and as a single process."""

import sys

import torch
from safetensors.torch import save_file

from distill import Distiller, Term, TrainConfig, Trainer
from distill.data import ArrayDataset, BatchLoader


def main(out: str, processes: int) -> None:
    torch.set_num_threads(1)
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
    distiller.dry_run(next(iter(loader)))
    trainer = Trainer(distiller, loader, TrainConfig(epochs=3, optimizer="sgd", lr=0.1, progress=False,
                                           tensorboard=False))
    trainer.fit()
    assert loader.world_size == processes  # each process really held a shard of every batch
    from distill.trainer import distributed_state

    state = distributed_state()
    assert state.num_processes == processes, (state.num_processes, processes)
    if state.is_main_process:
        save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
