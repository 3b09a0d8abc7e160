"""Benchmark: ``distill ladder`` on Fashion-MNIST: where does the teacher help most?

    python benchmarks/ladder.py --data ../shared/data/fashion-mnist --out benchmarks/results/ladder.json

One ``cnn`` teacher (``--teacher-width`` 32, depth 3, 94k parameters), trained once on
``--train-subset`` images and cached once; ``cnn`` depth-2 students of width 8 × {0.25, 0.5, 1, 2, 4} (2 to 32), each
trained alone (cross-entropy) and distilled (cross-entropy weight 0.1 plus KD, weight
``--kd-weight``, temperature ``--temperature``) for ``--epochs`` epochs (Adam, ``--lr``, cosine,
batch 64) over
``--seeds``, in ``--workers`` processes of one thread each. No augmentation (the cache needs no
views). Latency: batch 1, one thread, measured before training. Writes ``--out`` (JSON) and the
ladder's plot beside it (``--plot``).

The defaults are the KD settings ``benchmarks/sweep.py`` found on its validation split (KD weight
0.1 against cross-entropy 0.1, T 1.5, lr 0.006, rounded); the preset's own KD (weight 0.9, T 4,
lr 0.002) is ``--kd-weight 0.9 --temperature 4 --lr 0.002``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch


def recipe(args) -> dict:
    train = {"epochs": args.epochs, "optimizer": "adam", "lr": args.lr, "batch_size": 64, "schedule": "cosine",
             "tensorboard": False, "checkpoint_every": args.epochs}
    return {
        "name": "fashion-mnist-ladder",
        "seeds": list(args.seeds),
        "data": {"name": "fashion-mnist", "options": {"path": args.data}, "seed": 0,
                 "train_subset": args.train_subset, "eval_batch_size": 1000},
        "teacher": {"model": "cnn", "kwargs": {"width": args.teacher_width, "depth": 3},
                    "train": {**train, "lr": 0.002, "epochs": args.teacher_epochs,
                              "checkpoint_every": args.teacher_epochs}},
        "student": {"model": "cnn", "kwargs": {"width": 8, "depth": 2}},
        "train": train,
        "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.1},
                              {"name": "soft", "loss": "kd", "weight": args.kd_weight,
                               "params": {"temperature": args.temperature}}]},
        "evaluate": {"latency_repeats": 50},
    }


def main() -> int:
    from distill.ladder import run_ladder
    from distill.recipes import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/fashion-mnist")
    parser.add_argument("--out", default="benchmarks/results/ladder.json")
    parser.add_argument("--work", default="/tmp/distill-ladder", help="the ladder's folder (teacher, cache, runs)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the workers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--teacher-width", type=int, default=32)
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--kd-weight", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=0.006)
    parser.add_argument("--plot", default="ladder.png", help="file name of the plot, beside --out")
    args = parser.parse_args()

    from rich.console import Console

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    result = run_ladder(load_recipe(recipe(args)), scales=args.scales, out=args.work, workers=args.workers,
                        threads=args.threads, overwrite=True, console=Console(width=140))
    wall = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.files["plot"], out.parent / args.plot)
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(wall, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {**result.settings, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "train_subset": args.train_subset, "scales": args.scales},
        "recipe": recipe(args),
        "teacher": result.teacher,
        "rungs": result.rungs,
        "finding": result.to_dict()["finding"],
        "plot": str(out.parent / args.plot),
        "notes": result.notes,
    }
    out.write_text(json.dumps(record, indent=2))
    t = result.teacher
    print(f"teacher: {100 * t['score']:.2f}%, {t['params']:,} params, {t['latency_ms']:.3f} ms")
    print("| student | params | latency ms | alone % | distilled % | gain (points) |")
    print("|---|---|---|---|---|---|")
    for r in result.rungs:
        print(f"| {r['label']} | {r['params']:,} | {r['latency_ms']:.3f} | {100 * r['alone']:.2f} ± "
              f"{100 * r['alone_std']:.2f} | {100 * r['distilled']:.2f} ± {100 * r['distilled_std']:.2f} | "
              f"{100 * r['gain']:+.2f} ± {100 * r['gain_std']:.2f} |")
    print(f"finding: {result.finding.text}")
    if result.finding.advice:
        print(f"advice: {result.finding.advice}\n{result.finding.assistant_yaml}")
    print(f"{wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
