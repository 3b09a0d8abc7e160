"""Benchmark: ``distill sweep`` on Fashion-MNIST, the best recipe found against the default one.

    python benchmarks/sweep.py --data ../shared/data/fashion-mnist --out benchmarks/results/sweep.json

The recipe is the ``fashion-mnist`` preset made smaller so the whole search fits in half an hour
on two busy CPU cores: ``--train-subset`` training images (20% of them held out as the validation
split the sweep selects on), no augmentation (the teacher cache then needs no replayed views), a
``cnn`` width-32 teacher trained once and cached once, a ``cnn`` width-8 depth-2 student, KD
(α 0.9, T 4) for ``--epochs`` epochs (Adam, lr 0.002, cosine, batch 64). The sweep searches its
default space (KD temperature, KD weight against the fixed cross-entropy weight, learning rate,
student width and depth) with ``--trials`` trials in ``--workers`` processes of one thread each,
pruning with the median rule. Afterwards the default recipe and the best trial's recipe are each run on every seed and
evaluated on the test split the same way. Writes ``--out`` (JSON) and the sweep's plots beside it
(``sweep-pareto.png``, ``sweep-importance.png``).
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
    train = {"epochs": args.epochs, "optimizer": "adam", "lr": 0.002, "batch_size": 64, "schedule": "cosine",
             "tensorboard": False, "checkpoint_every": args.epochs}
    return {
        "name": "fashion-mnist-sweep",
        "seeds": list(args.seeds),
        "data": {"name": "fashion-mnist", "options": {"path": args.data}, "seed": 0,
                 "train_subset": args.train_subset, "val_fraction": 0.2, "eval_batch_size": 1000},
        "teacher": {"model": "cnn", "kwargs": {"width": 32, "depth": 3},
                    "train": {**train, "epochs": args.teacher_epochs, "checkpoint_every": args.teacher_epochs}},
        "student": {"model": "cnn", "kwargs": {"width": 8, "depth": 2}},
        "train": train,
        "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.1},
                              {"name": "soft", "loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]},
        "evaluate": {"latency_repeats": 30},
    }


def main() -> int:
    from distill.recipes import load_recipe
    from distill.sweep import run_sweep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/fashion-mnist")
    parser.add_argument("--out", default="benchmarks/results/sweep.json")
    parser.add_argument("--work", default="/tmp/distill-sweep", help="the sweep's folder (teacher, cache, study)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the workers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=6000)
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    result = run_sweep(load_recipe(recipe(args)), args.trials, out=args.work, workers=args.workers,
                       threads=args.threads, overwrite=True, verbose=True)
    wall = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = {}
    for key, name in (("pareto_plot", "sweep-pareto.png"), ("importance_plot", "sweep-importance.png")):
        if key in result.files:
            shutil.copyfile(result.files[key], out.parent / name)
            plots[key] = str(out.parent / name)
    c = result.comparison
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(wall, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {**result.settings, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "train_subset": args.train_subset, "seeds": args.seeds},
        "recipe": recipe(args),
        "space": result.space,
        "teacher": result.teacher,
        "best": result.best,
        "comparison": c,
        "importances": result.importances,
        "trials": result.trials,
        "plots": plots,
        "notes": result.notes,
    }
    out.write_text(json.dumps(record, indent=2))
    states = [t["state"] for t in result.trials]
    print(f"{len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed) in {wall / 60:.1f} min")
    print(f"best trial {result.best['number']}: validation accuracy {100 * result.best['val_score']:.2f}% "
          f"with {result.best['params']}")
    if c:
        for name in ("default", "best"):
            s = c[name]
            print(f"{name}: test accuracy {100 * s['score']:.2f} ± {100 * s['score_std']:.2f}% "
                  f"(seeds {c['seeds']}), {s['params']:,} params, {s.get('latency_ms') or 0:.3f} ms")
        print(f"best - default: {c['gain_points']:+.2f} points")
        if "best_settings" in c:
            s = c["best_settings"]
            print(f"best settings on the default student: test accuracy {100 * s['score']:.2f} ± "
                  f"{100 * s['score_std']:.2f}%, {c['gain_points_same_student']:+.2f} points over the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
