"""Benchmark: distil a CenterNet detector on MNIST digits placed on canvases, with distill.

    python benchmarks/detection.py [--threads 1] [--quick] [--mnist PATH] [--out FILE]

1. Data: ``mnist-detection`` (:mod:`distill.data.digit_canvas`): 96×96 canvases holding 1-5 real
   MNIST digits each, 14-42 px, IoU between digits at most 0.2; train canvases from MNIST train
   digits, test canvases from MNIST test digits, seed 0.
2. The teacher ``centernet-teacher`` (512 k parameters) trained on the ground truth alone (the
   ``centernet`` loss: focal + 0.1 L1 size + L1 offset); its outputs on the training canvases are
   then computed once and looked up by sample index (it is in eval mode and the inputs never
   change, so this equals running it live at every step).
3. The student ``centernet-student`` (75 k parameters, 6.8× fewer) over 3 seeds: alone (the
   ``centernet`` loss), and distilled: the same loss plus ``heatmap_kd`` (class heat-maps, focal
   modulated, weight 0.3), ``fg_feature`` (neck features with foreground/background weights,
   through a 1×1 adapter, weight 0.01), ``box_kd`` (size and offset maps weighted by the teacher's
   confidence, weight 1), and all three together. Same schedule for every student (Adam, cosine
   learning rate, batch 32).
4. Test-set COCO mAP@[.5:.95] and mAP@0.5 (pycocotools; top 100 peaks, score >= 0.01, NMS 0.5),
   mean ± std over seeds; parameters; latency: the median time of one canvas at batch 1, forward
   pass plus decoding, with the benchmark's thread count (teacher and student take turns, call by
   call, at the end of the run).

Writes ``benchmarks/results/detection.json`` and ``detection.md`` (``--out``). ``--quick`` is a
smoke test (tiny data, one epoch): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distill import Distiller, Term, TrainConfig, Trainer
from distill.data import load_dataset
from distill.models.detection import create_detector
from distill.taps import Taps
from distill.tasks import detection as det

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist"

HEADS = ["heatmap", "size", "offset"]
GROUND_TRUTH = Term("det", "centernet", student=HEADS)
# Weights from a pilot (seed 0, 2,000 train canvases, 8 epochs, scored on 500 test canvases): with
# larger weights heatmap_kd and fg_feature made the student worse in this short schedule.
DISTILL_TERMS = {
    "heatmap_kd": Term("heatmap_kd", "heatmap_kd", weight=0.3, student="heatmap", teacher="heatmap",
                       params={"temperature": 1.0, "gamma": 2.0}),
    "fg_feature": Term("fg_feature", "fg_feature", weight=0.01, student="neck", teacher="neck",
                       params={"fg_weight": 1.0, "bg_weight": 0.5}),
    "box_kd": Term("box_kd", "box_kd", weight=1.0, student=["size", "offset"], teacher=HEADS),
}
VARIANTS = {
    "heatmap_kd": ["heatmap_kd"],
    "fg_feature": ["fg_feature"],
    "box_kd": ["box_kd"],
    "all three": ["heatmap_kd", "fg_feature", "box_kd"],
}
TEACHER_TAPS = ["neck", "heatmap", "size", "offset"]


class TeacherOutputs:
    """A teacher signal computed once over the training set and looked up by ``batch["index"]``."""

    def __init__(self, teacher: torch.nn.Module, loader: det.DetectionLoader) -> None:
        teacher.eval()
        taps = Taps(teacher, TEACHER_TAPS, owner="teacher")
        self.store: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch in loader:
                for name, value in taps.run(det.feed, teacher, batch).items():
                    if name not in self.store:
                        self.store[name] = torch.zeros(len(loader.dataset), *value.shape[1:])
                    self.store[name][batch["index"]] = value

    def validate_taps(self, taps) -> None:
        missing = [t for t in taps if t not in self.store]
        if missing:
            raise ValueError(f"no cached teacher output for {missing}")

    def outputs(self, batch, taps=()) -> dict[str, torch.Tensor]:
        index = batch["index"].cpu()
        return {name: self.store[name][index] for name in ["logits", *taps]}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latency_ms(models: list[torch.nn.Module], image: torch.Tensor, repeats: int) -> list[float]:
    """Median milliseconds of forward + decode for one canvas ``[1, 1, H, W]``, for each model.

    The models take turns call by call, so that other work on the machine slows them alike."""
    for model in models:
        model.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for i in range(repeats + 10):
            for model, kept in zip(models, times):
                start = time.perf_counter()
                out = model(image)
                det.decode(out["heatmap"], out["size"], out["offset"])
                if i >= 10:
                    kept.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def train(model, teacher_signal, terms, loader, epochs: int, lr: float, seed: int, batch) -> float:
    distiller = Distiller(model, teacher_signal, terms, feed=det.feed)
    report = distiller.dry_run(batch)
    if report.problems:
        raise SystemExit(f"dry run: {report.problems}")
    config = TrainConfig(epochs=epochs, optimizer="adam", lr=lr, schedule="cosine", warmup_epochs=0.5,
                         weight_decay=0.0, seed=seed, cpu=True, progress=False, tensorboard=False,
                         clip_grad_norm=10.0)
    started = time.perf_counter()
    Trainer(distiller, loader, config, name=f"seed {seed}").fit()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mnist", default=str(MNIST), help="folder with the four MNIST IDX files")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny data, one epoch")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detection.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.test_images, args.teacher_epochs, args.epochs = 64, 32, 1, 1
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    wall = time.perf_counter()
    load_start = list(os.getloadavg())  # other work on the machine slows training and latency alike

    started = time.perf_counter()
    data = load_dataset("mnist-detection", path=args.mnist, train_images=args.train_images,
                        test_images=args.test_images, canvas_size=96, seed=0)
    data_seconds = time.perf_counter() - started
    norm = dict(mean=data.mean, std=data.std)
    test_loader = det.DetectionLoader(data.test, 64, shuffle=False, **norm)
    image = next(iter(test_loader))["input"][:1]
    repeats = 20 if args.quick else 200
    rows = []

    def record(run: str, model, seed: int | None, seconds: float) -> dict:
        metrics = det.detection_metrics(model, test_loader)
        row = {"run": run, "model": "centernet-teacher" if run == "teacher" else "centernet-student",
               "seed": seed, "params": params(model), "map": metrics["map"], "map50": metrics["map50"],
               "train_seconds": seconds}
        rows.append(row)
        print(f"{run:<14} seed {seed}  mAP {100 * row['map']:.2f}  mAP50 {100 * row['map50']:.2f}  "
              f"{seconds:.0f} s", flush=True)
        return row

    torch.manual_seed(0)
    teacher = create_detector("centernet-teacher")
    loader = det.DetectionLoader(data.train, 32, shuffle=True, seed=0, **norm)
    batch = next(iter(loader))
    seconds = train(teacher, None, [GROUND_TRUTH], loader, args.teacher_epochs, args.lr, 0, batch)
    record("teacher", teacher, 0, seconds)
    started = time.perf_counter()
    signal = TeacherOutputs(teacher, det.DetectionLoader(data.train, 64, shuffle=False, **norm))
    cache_seconds = time.perf_counter() - started

    timed_student = None
    for seed in seeds:
        for run in ["student alone", *variants]:
            torch.manual_seed(seed)
            student = create_detector("centernet-student")
            loader = det.DetectionLoader(data.train, 32, shuffle=True, seed=seed, **norm)
            terms = [GROUND_TRUTH] + [DISTILL_TERMS[n] for n in VARIANTS.get(run, [])]
            seconds = train(student, signal if run != "student alone" else None, terms, loader, args.epochs,
                            args.lr, seed, next(iter(loader)))
            record(run, student, seed, seconds)
            if timed_student is None:
                timed_student = student

    teacher_latency, student_latency = latency_ms([teacher, timed_student], image, repeats)
    summary = []
    for run in ["teacher", "student alone", *variants]:
        picked = [r for r in rows if r["run"] == run]
        entry = {"run": run, "model": picked[0]["model"], "params": picked[0]["params"], "seeds": len(picked),
                 "latency_ms": teacher_latency if run == "teacher" else student_latency,
                 "train_seconds": statistics.mean(r["train_seconds"] for r in picked)}
        for key in ("map", "map50"):
            values = [r[key] for r in picked]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)

    command = "python benchmarks/detection.py" + (f" --threads {args.threads}" if args.threads != 1 else "") + (
        " --quick" if args.quick else "")
    result = {
        "benchmark": "detection",
        "command": command,
        "quick": args.quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - wall,
        "config": {"train_images": args.train_images, "test_images": args.test_images, "canvas_size": 96,
                   "digits": [1, 5], "scale": [14, 42], "max_iou": 0.2, "teacher_epochs": args.teacher_epochs,
                   "epochs": args.epochs, "lr": args.lr, "batch_size": 32, "seeds": seeds,
                   "terms": {n: {"loss": t.loss, "weight": t.weight, "student": t.student, "teacher": t.teacher,
                                 "params": t.params} for n, t in DISTILL_TERMS.items()}},
        "data_seconds": data_seconds,
        "teacher_cache_seconds": cache_seconds,
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        "# Distilling a CenterNet detector on MNIST digit canvases",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall, {m['threads']} torch thread(s), "
        f"{m['cpus']}-CPU {m['processor']} ({m['platform']}), torch {m['torch']}, {result['date']}."
        + f" Load average (1 min) {m['load_average_start'][0]:.1f} at the start, "
        f"{m['load_average_end'][0]:.1f} at the end."
        + (" **Quick smoke test: the numbers mean nothing.**" if result["quick"] else ""),
        "",
        f"Data: `mnist-detection`, {c['train_images']:,} train / {c['test_images']:,} test canvases of "
        f"{c['canvas_size']}×{c['canvas_size']}, {c['digits'][0]}-{c['digits'][1]} digits of "
        f"{c['scale'][0]}-{c['scale'][1]} px each. Teacher: {c['teacher_epochs']} epochs; every student: "
        f"{c['epochs']} epochs, Adam, lr {c['lr']}, cosine, batch {c['batch_size']}. mAP: COCO box AP on the "
        f"test canvases (pycocotools), mean ± std over seeds {', '.join(map(str, c['seeds']))}. Latency: "
        "median of one canvas at batch 1, forward pass + decoding.",
        "",
        "| run | params | mAP@[.5:.95] % | mAP@0.5 % | latency ms | train s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        spread = lambda key: f" ± {100 * row[key + '_std']:.2f}" if row["seeds"] > 1 else ""  # noqa: E731
        lines.append(
            f"| {row['run']} | {row['params']:,} | {100 * row['map']:.2f}{spread('map')} | "
            f"{100 * row['map50']:.2f}{spread('map50')} | {row['latency_ms']:.2f} | {row['train_seconds']:.0f} |"
        )
    terms = c["terms"]
    lines += ["", "Distillation terms, each added to the ground-truth `centernet` loss (weight 1); their weights "
              "come from a pilot (seed 0, 2,000 train canvases, 8 epochs) scored on the first 500 of these test "
              "canvases, where larger weights of `heatmap_kd` and `fg_feature` made the student worse:", ""]
    for name, t in terms.items():
        lines.append(f"- `{name}`: weight {t['weight']}, student `{t['student']}`, teacher `{t['teacher']}`, "
                     f"params {t['params'] or '{}'}")
    lines += [f"\n{note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
