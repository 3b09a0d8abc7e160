"""Benchmark: ``train.channels_last`` on the CPU: an epoch of distill's Trainer with and without it.

    python benchmarks/channels_last.py [--repeats 5] [--samples 3000] [--threads 1] [--data-dir ../shared/data]

For the CNN pairs of ``benchmarks/wins.py`` (Fashion-MNIST: teacher cnn width 16, students width 8
and 4; CIFAR-10: teacher width 16, students width 8 and 4, and the width-16 teacher's own training) it times
one epoch of ``Trainer`` + ``Distiller`` with the live teacher (CE 0.1 + KD 0.9, Adam, batch 128) on
``--samples`` training images, the two memory formats interleaved (the order swapped every repeat),
and reports the median epoch time of each and their ratio. It also checks that the two train the
same student (largest relative weight difference after the epoch). Writes
``benchmarks/results/channels_last.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distill import Distiller, Term, TrainConfig, Trainer
from distill.data import BatchLoader, load_dataset
from distill.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CASES = {  # name: (data set, its path under the data folder, teacher width or None (trained alone), student width)
    "fashion cnn16 -> cnn8": ("fashion-mnist", "fashion-mnist", 16, 8),
    "fashion cnn16 -> cnn4": ("fashion-mnist", "fashion-mnist", 16, 4),
    "cifar10 cnn16 -> cnn8": ("cifar10", "cifar10-jpg/cifar10-jpg.tar.gz", 16, 8),
    "cifar10 cnn16 -> cnn4": ("cifar10", "cifar10-jpg/cifar10-jpg.tar.gz", 16, 4),
    "cifar10 cnn16 alone (a teacher's training)": ("cifar10", "cifar10-jpg/cifar10-jpg.tar.gz", None, 16),
}


def epoch(case: str, data, train, channels_last: bool) -> tuple[float, dict]:
    _, _, teacher_width, student_width = CASES[case]
    torch.manual_seed(0)
    teacher = None if teacher_width is None else create_model("cnn", 10, data.input_shape, width=teacher_width, depth=3).eval()
    torch.manual_seed(1)
    student = create_model("cnn", 10, data.input_shape, width=student_width, depth=3)
    terms = ([Term("hard", "ce")] if teacher is None
             else [Term("hard", "ce", 0.1), Term("soft", "kd", 0.9, params={"temperature": 1.0})])
    loader = BatchLoader(train, 128, shuffle=True, seed=0, drop_last=True, mean=data.mean, std=data.std)
    config = TrainConfig(epochs=1, optimizer="adam", lr=2e-3, schedule="constant", progress=False,
                         channels_last=channels_last)
    started = time.perf_counter()
    Trainer(Distiller(student, teacher, terms), loader, config).fit()
    return time.perf_counter() - started, {k: v.detach().clone() for k, v in student.state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "channels_last.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = []
    for case, (name, path, _, _) in CASES.items():
        data = load_dataset(name, path=str(args.data_dir / path))
        train = data.train.subset(torch.arange(min(args.samples, len(data.train))))
        times = {False: [], True: []}
        weights = {}
        for r in range(args.repeats):
            for flag in ((False, True) if r % 2 == 0 else (True, False)):
                seconds, weights[flag] = epoch(case, data, train, flag)
                times[flag].append(seconds)
        diff = max(float((weights[True][k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                   for k, v in weights[False].items() if v.is_floating_point())
        nchw, nhwc = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"case": case, "epoch_s_nchw": round(nchw, 3), "epoch_s_channels_last": round(nhwc, 3),
                     "speedup": round(nchw / nhwc, 3), "max_relative_weight_difference": diff})
        print(rows[-1], flush=True)
    result = {
        "command": "python benchmarks/channels_last.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("repeats", args.repeats), ("samples", args.samples), ("threads", args.threads))),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"processor": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    m = result["machine"]
    lines = ["# train.channels_last on the CPU", "",
             f"`{result['command']}`; {m['processor']}, {m['cpus']} CPUs, {m['threads']} torch thread(s), torch "
             f"{m['torch']}, {result['date']}, load average {m['load_average_start'][0]} at the start and "
             f"{m['load_average_end'][0]} at the end. One epoch of `Trainer` + `Distiller` (with the live teacher where there is one), median "
             f"of {args.repeats} interleaved repeats each.", "",
             "| case | epoch s, NCHW | epoch s, channels_last | speed-up | largest relative weight difference |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['epoch_s_nchw']} | {r['epoch_s_channels_last']} | {r['speedup']:.2f}x | "
              f"{r['max_relative_weight_difference']:.1e} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
