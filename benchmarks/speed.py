"""Benchmark: what distillation costs per epoch, and what the teacher cache saves.

    python benchmarks/speed.py [--repeats 5] [--samples 20000] [--threads N]

For each pair (the Hinton MNIST MLPs; a convolutional pair on Fashion-MNIST) it times one epoch of
  (a) a hand-written PyTorch loop that runs the teacher every step (the PyTorch KD tutorial's loop,
      with the data already in memory as normalised tensors: the fastest fair version of it),
  (b) a hand-written loop training the student alone (the physical limit),
  (c) distill online: ``Trainer`` + ``Distiller`` + live teacher,
  (d) distill with the teacher cache,
interleaved (a, b, c, d, a, b, ...) so machine noise hits all alike, and reports medians and the
ratios (c)/(a) (target <= 1.05) and (d)/(b) (target <= 1.10), with glibc's malloc tuned for all four
as distill's trainer tunes it on the CPU (``distill.allocator``); plus each method's peak memory above what
the process already held (sampled every 2 ms during one epoch) and the cache's build time and size. Data: ../shared/data (or
--data-dir). Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import Distiller, Term, TrainConfig, Trainer
from distill.allocator import keep_freed_memory
from distill.cache import TeacherCache, build_cache
from distill.data import BatchLoader, load_dataset
from distill.models import create_model
from distill.pipeline import free_cores

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PAIRS = {
    "mnist-mlp": dict(data="mnist", teacher=("hinton-teacher", {}), student=("hinton-student", {})),
    "fashion-cnn": dict(data="fashion-mnist", teacher=("cnn", {"width": 64, "depth": 3}),
                        student=("cnn", {"width": 8, "depth": 2})),
}
BATCH, T, ALPHA = 128, 4.0, 0.9


def setup(pair: str, samples: int, data_dir: Path):
    spec = PAIRS[pair]
    data = load_dataset(spec["data"], path=str(data_dir / spec["data"]))
    train = data.train.subset(torch.arange(min(samples, len(data.train))))
    torch.manual_seed(0)
    teacher = create_model(spec["teacher"][0], 10, data.input_shape, **spec["teacher"][1]).eval()
    return data, train, teacher


def make_student(pair: str, data):
    torch.manual_seed(1)
    name, kwargs = PAIRS[pair]["student"]
    return create_model(name, 10, data.input_shape, **kwargs)


def hand_loop(student, teacher, x_all, y_all, epoch: int) -> None:
    """The tutorial's loop: soft targets at T, T^2 scaling, alpha * soft + (1 - alpha) * hard."""
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(epoch))
    for k in range(len(x_all) // BATCH):
        idx = perm[k * BATCH:(k + 1) * BATCH]
        x, y = x_all[idx], y_all[idx]
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x)
            soft = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t / T, -1),
                            reduction="batchmean", log_target=True) * T * T
            loss = ALPHA * soft + (1 - ALPHA) * loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def distill_epoch(student, signal, loader) -> None:
    d = Distiller(student, signal, [Term("hard", "ce", 1 - ALPHA), Term("soft", "kd", ALPHA, params={"temperature": T})])
    Trainer(d, loader, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="constant", progress=False)).fit()


def run_method(method: str, pair: str, samples: int, data_dir: Path, cache_dir: Path | None, state) -> float:
    data, train, teacher, x_all, y_all = state
    student = make_student(pair, data)
    loader = BatchLoader(train, BATCH, shuffle=True, seed=0, drop_last=True, mean=data.mean, std=data.std)
    start = time.perf_counter()
    if method == "a":
        hand_loop(student, teacher, x_all, y_all, 0)
    elif method == "b":
        hand_loop(student, None, x_all, y_all, 0)
    elif method == "c":
        distill_epoch(student, teacher, loader)
    elif method == "d":
        distill_epoch(student, TeacherCache(cache_dir, verify=False), loader)
    return time.perf_counter() - start


def prepare(pair: str, samples: int, data_dir: Path):
    data, train, teacher = setup(pair, samples, data_dir)
    loader = BatchLoader(train, 4096, shuffle=False, mean=data.mean, std=data.std)
    x_all = torch.cat([b["input"] for b in loader])
    return data, train, teacher, x_all, train.targets.long()


class RssSampler:
    """Peak resident memory above the starting point, sampled from /proc every 2 ms in a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=str(SHARED))
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = parser.parse_args()
    threads = args.threads or free_cores()
    torch.set_num_threads(threads)
    # as distill's trainer does on the CPU; set here so the hand-written loops get it too
    allocator = keep_freed_memory()
    data_dir = Path(args.data_dir)
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cores_free": free_cores(), "torch_threads": threads,
                    "torch": torch.__version__},
        "settings": {"samples_per_epoch": args.samples, "batch_size": BATCH, "repeats": args.repeats,
                     "temperature": T, "alpha": ALPHA, "optimizer": "adam",
                     "allocator": "glibc malloc keeps freed memory (distill.allocator), all four methods"
                     if allocator else "default"},
        "pairs": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="distill-speed-"))
    try:
        for pair in args.pairs.split(","):
            state = prepare(pair, args.samples, data_dir)
            data, train, teacher, _, _ = state
            cache_dir = tmp / f"{pair}-cache"
            started = time.perf_counter()
            build_cache(teacher, BatchLoader(train, 512, shuffle=False, mean=data.mean, std=data.std), cache_dir)
            build_seconds = time.perf_counter() - started
            cache_bytes = sum(f.stat().st_size for f in cache_dir.iterdir())
            times = {m: [] for m in "abcd"}
            run_method("c", pair, args.samples, data_dir, cache_dir, state)  # warm-up (imports, allocator)
            for _ in range(args.repeats):
                for m in "abcd":
                    times[m].append(run_method(m, pair, args.samples, data_dir, cache_dir, state))
            med = {m: statistics.median(v) for m, v in times.items()}
            memory = {}
            for m in "abcd":  # one more epoch each, watching memory above what the process held
                with RssSampler() as sampler:
                    run_method(m, pair, args.samples, data_dir, cache_dir, state)
                memory[m] = round(sampler.extra_mib, 1)
            record["pairs"][pair] = {
                "epoch_seconds_median": {
                    "a_hand_loop_with_teacher": med["a"], "b_student_alone": med["b"],
                    "c_distill_online": med["c"], "d_distill_cached": med["d"],
                },
                "epoch_seconds_all": times,
                "ratio_online_vs_hand_loop": med["c"] / med["a"],
                "ratio_cached_vs_student_alone": med["d"] / med["b"],
                "speedup_cached_vs_hand_loop": med["a"] / med["d"],
                "peak_memory_above_start_mib": memory,
                "cache_build_seconds": build_seconds,
                "cache_bytes": cache_bytes,
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in make_student(pair, data).parameters()),
            }
            r = record["pairs"][pair]
            print(f"{pair}: a {med['a']:.2f}s  b {med['b']:.2f}s  c {med['c']:.2f}s  d {med['d']:.2f}s  "
                  f"c/a {r['ratio_online_vs_hand_loop']:.3f}  d/b {r['ratio_cached_vs_student_alone']:.3f}  "
                  f"cache {build_seconds:.1f}s {cache_bytes / 2**20:.2f} MiB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
