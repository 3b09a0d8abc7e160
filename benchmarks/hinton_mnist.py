"""Benchmark: reproduce Hinton, Vinyals & Dean (2015), MNIST (section 3), with distill.

    python benchmarks/hinton_mnist.py [--threads N] [--quick] [--run-dir DIR [--resume]] [--data PATH]
    python benchmarks/hinton_mnist.py --shipped [--threads N] [--quick] [--run-dir DIR [--resume]]

Trains the 784-1200-1200-10 teacher (dropout, ±2-pixel jitter) once, caches it once over the
jittered views (``data.views``), and reuses that one teacher and one cache for every student run:

- the 784-800-800-10 student alone, the paper's baseline: no jitter, no regularisation;
- the same student alone on the same jittered views the distilled students see;
- the student distilled at T = 20 (the preset ``hinton-mnist``), and at T = 1, 2, 4, 8;
- a 784-30-30-10 student alone and distilled at several temperatures (capacity).

``--shipped`` runs the paper's setting with the teacher shipped in ``distill.teachers``
(``mnist-hinton1200``: 240 epochs of fresh jitter; its command, log and CPU time in its manifest)
instead of training one: the 800-800 student trained **without jitter**, alone and distilled, 3
seeds, the same schedule; the distilled student's temperature and weights chosen by the pilot on a
validation split carved from the training data (temperatures 1, 2, 4, 8, 20), never the test split.
It writes ``benchmarks/results/hinton_mnist_shipped.{json,md}`` (targets: distilled <= 74 test
errors, the paper's; student training <= 20 CPU minutes).

Writes ``benchmarks/results/hinton_mnist.json`` (``--out``) and prints a markdown table with the
paper's test errors (out of 10,000) beside ours. Run directories go to a temporary folder unless
``--run-dir`` is given. ``--quick`` is a smoke test (a data subset, a few epochs): its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import distill
from distill.logbook import read_metrics
from distill.pipeline import Run

ROOT = Path(__file__).resolve().parent.parent
PRESET = "hinton-mnist"
TEST_SIZE = 10_000

# Test errors out of 10,000 reported by Hinton, Vinyals & Dean (2015), section 3.
PAPER = {"teacher": 67, "paper-baseline": 146, "distilled-T20": 74}


def errors(accuracy: float, n: int = TEST_SIZE) -> int:
    return round((1.0 - accuracy) * n)


def stage_seconds(run_dir: Path, stage: str) -> float:
    """Training time of one stage: the sum of its epochs' wall times (metrics.csv)."""
    path = run_dir / "stages" / stage / "metrics.csv"
    return sum(row["epoch_seconds"] for row in read_metrics(path)) if path.exists() else 0.0


class Study:
    """Runs recipes derived from the preset, one run directory each, and collects table rows."""

    def __init__(self, root: Path, base: list[str], verbose: bool, resume: bool = False) -> None:
        self.root = root
        self.resume = resume
        self.base = base
        self.verbose = verbose
        self.runs: list[dict] = []
        self.rows: list[dict] = []

    def run(self, name: str, overrides: list[str]) -> tuple[dict, Path, float]:
        recipe = distill.load_recipe(PRESET, self.base + overrides)
        run_dir = self.root / name
        started = time.perf_counter()
        console = _Console(name) if self.verbose else None
        resume = self.resume and run_dir.exists()
        results = Run(recipe, run_dir, overwrite=not resume, resume=resume, progress=False, console=console).execute()
        wall = time.perf_counter() - started
        self.runs.append({"run": name, "overrides": overrides, "wall_seconds": round(wall, 1)})
        print(f"[{name}] {wall:.1f} s", flush=True)
        return results, run_dir, wall

    def add(self, key: str, label: str, results: dict, role: str, run_dir: Path, *, model: str,
            temperature: float | None, augment: str, seeds: list[int] | None) -> dict:
        summary = results[role]
        if role == "teacher":
            accuracies, seconds = [summary["accuracy"]], stage_seconds(run_dir, "teacher")
        else:
            accuracies = summary["per_seed"]["accuracy"]
            seconds = sum(stage_seconds(run_dir, f"{role}-seed{s}") for s in seeds)
        errs = [errors(a) for a in accuracies]
        row = {
            "key": key,
            "label": label,
            "model": model,
            "params": summary["params"],
            "temperature": temperature,
            "augment": augment,
            "seeds": seeds,
            "errors_per_seed": errs,
            "errors_mean": statistics.fmean(errs),
            "errors_std": statistics.stdev(errs) if len(errs) > 1 else None,
            "accuracy": summary["accuracy"],
            "accuracy_std": summary.get("accuracy_std"),
            "agreement_with_teacher": summary.get("agreement"),
            "train_seconds": round(seconds, 1),
            "paper_errors": PAPER.get(key),
            "run": run_dir.name,
        }
        self.rows.append(row)
        return row


class _Console:
    """Prints a run's progress lines with the run's name and the time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.perf_counter()

    def print(self, message: str) -> None:
        print(f"  [{self.name} +{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)


def settings(quick: bool) -> dict:
    if quick:
        return dict(teacher_epochs=2, student_epochs=1, views=2, seeds=[0], sweep_seeds=[0],
                    subset=["data.train_subset=4000"])
    return dict(teacher_epochs=None, student_epochs=None, views=None, seeds=[0, 1, 2], sweep_seeds=[0],
                subset=[])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a subset and a few epochs")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                        help="folder holding the four MNIST IDX files")
    parser.add_argument("--run-dir", default=None, help="where the run directories go (default: a temp folder)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/hinton_mnist.json; "
                        "a markdown table goes beside it)")
    parser.add_argument("--sweep-seeds", default=None, help="seeds of the temperature sweep and the 30-30 "
                        "student, comma-separated (default: 0)")
    parser.add_argument("--tiny-temperatures", default="1,2.5,4,8,20")
    parser.add_argument("--sweep-temperatures", default="1,2,4,8")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted benchmark in --run-dir: "
                        "finished stages are kept (their runs' wall times then count only the rest)")
    parser.add_argument("--verbose", action="store_true", help="print each run's progress lines")
    parser.add_argument("--shipped", action="store_true", help="the shipped teacher, the student without jitter, "
                        "temperature chosen by the pilot on validation data (hinton_mnist_shipped.json)")
    args = parser.parse_args()
    if args.shipped:
        return shipped(args)

    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    if args.sweep_seeds:
        cfg["sweep_seeds"] = [int(s) for s in args.sweep_seeds.split(",")]
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="distill-hinton-"))
    root.mkdir(parents=True, exist_ok=True)
    # a smoke test's numbers mean nothing: they stay beside its run directories
    out = Path(args.out) if args.out else (root / "hinton_mnist_quick.json" if args.quick
                                           else ROOT / "benchmarks" / "results" / "hinton_mnist.json")

    base = [f"data.options.path={args.data}", f"threads={args.threads}", *cfg["subset"]]
    if cfg["teacher_epochs"]:
        base += [f"teacher.train.epochs={cfg['teacher_epochs']}", f"train.epochs={cfg['student_epochs']}",
                 f"data.views={cfg['views']}"]
    preset = distill.load_recipe(PRESET, base)
    # one checkpoint per stage (its last epoch) instead of one per epoch, which costs time here;
    # --resume therefore keeps finished stages and restarts an interrupted one from its start
    base += [f"teacher.train.checkpoint_every={preset.teacher.train.epochs}",
             f"train.checkpoint_every={preset.train.epochs}"]
    if args.resume and not args.run_dir:
        parser.error("--resume needs the --run-dir of the interrupted benchmark")
    study = Study(root, base, args.verbose, args.resume)
    seeds, sweep_seeds = cfg["seeds"], cfg["sweep_seeds"]
    only_distill = ["baseline.enabled=false"]
    only_baseline = ["distill.enabled=false"]
    no_latency = ["evaluate.latency=false"]
    started = time.perf_counter()

    # 1. the teacher, trained once, and its cache over every jittered view, built once
    results, teacher_dir, _ = study.run("teacher", ["seeds=[0]", *only_distill, *only_baseline])
    study.add("teacher", "teacher 1200-1200, dropout, ±2 px jitter", results, "teacher", teacher_dir,
              model="hinton-teacher", temperature=None, augment="jitter (views)", seeds=None)
    reuse = [f"teacher.weights={teacher_dir / 'teacher.safetensors'}", "teacher.train=null",
             f"teacher.cache={teacher_dir / 'teacher-cache'}"]

    # 2. the main rows: the student alone on the same views, and distilled at T = 20, 3 seeds
    results, run_dir, _ = study.run("main", [*reuse, f"seeds={seeds}"])
    study.add("same-aug-baseline", "student 800-800 alone, same jittered views", results, "baseline", run_dir,
              model="hinton-student", temperature=None, augment="jitter (views)", seeds=seeds)
    study.add("distilled-T20", "student 800-800 distilled, T = 20", results, "student", run_dir,
              model="hinton-student", temperature=20.0, augment="jitter (views)", seeds=seeds)

    # 3. the paper's baseline: the student alone, no jitter, no regularisation
    results, run_dir, _ = study.run("paper-baseline", [
        f"teacher.weights={teacher_dir / 'teacher.safetensors'}", "teacher.train=null", "teacher.cache=null",
        "data.augment.crop_padding=0", "data.views=null", f"seeds={seeds}", *only_baseline])
    study.add("paper-baseline", "student 800-800 alone, no jitter (paper's baseline)", results, "baseline",
              run_dir, model="hinton-student", temperature=None, augment="none", seeds=seeds)

    # 4. temperature sweep of the 800-800 student
    for t in [float(x) for x in args.sweep_temperatures.split(",") if x]:
        results, run_dir, _ = study.run(f"student-T{t:g}", [
            *reuse, f"seeds={sweep_seeds}", *only_distill, *no_latency,
            f"distill.terms.1.params.temperature={t}"])
        study.add(f"distilled-T{t:g}", f"student 800-800 distilled, T = {t:g}", results, "student", run_dir,
                  model="hinton-student", temperature=t, augment="jitter (views)", seeds=sweep_seeds)

    # 5. capacity: the 30-30 student alone (same views) and distilled at several temperatures
    for i, t in enumerate(float(x) for x in args.tiny_temperatures.split(",") if x):
        stages = [] if i == 0 else only_distill
        results, run_dir, _ = study.run(f"tiny-T{t:g}", [
            *reuse, "student.model=hinton-tiny", f"seeds={sweep_seeds}", *stages, *no_latency,
            f"distill.terms.1.params.temperature={t}"])
        if i == 0:
            study.add("tiny-same-aug-baseline", "student 30-30 alone, same jittered views", results, "baseline",
                      run_dir, model="hinton-tiny", temperature=None, augment="jitter (views)", seeds=sweep_seeds)
        study.add(f"tiny-distilled-T{t:g}", f"student 30-30 distilled, T = {t:g}", results, "student", run_dir,
                  model="hinton-tiny", temperature=t, augment="jitter (views)", seeds=sweep_seeds)

    wall = time.perf_counter() - started
    record = {
        "benchmark": "Hinton, Vinyals & Dean (2015), MNIST: teacher, student alone, distilled student",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "quick": args.quick,
        "resumed": args.resume,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(wall, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "recipe": PRESET,
            "base_overrides": base,
            "teacher": preset.teacher.model_dump(mode="json", exclude={"kwargs"}),
            "student_train": preset.train.model_dump(mode="json"),
            "views": preset.data.views,
            "crop_padding": preset.data.augment.crop_padding,
            "distill_terms": [t.model_dump(mode="json") for t in preset.distill.terms],
        },
        "paper": {"teacher": 67, "student_alone": 146, "distilled": 74, "test_set": TEST_SIZE},
        "rows": study.rows,
        "runs": study.runs,
    }
    table = markdown(study.rows)
    write_record(out, record, f"`{record['command']}`: {wall:.0f} s wall, {torch.get_num_threads()} threads, torch "
                              f"{torch.__version__}, {record['date']}.\n\n{table}")
    print()
    print(table)
    print(f"\nwhole benchmark: {wall:.1f} s wall on {torch.get_num_threads()} threads; results: {out}")
    print(f"run directories: {root}")
    return 0


SHIPPED = "mnist-hinton1200"
PILOT_TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 20.0]


def shipped(args: argparse.Namespace) -> int:
    """The paper's setting with the shipped teacher (see the module docstring, ``--shipped``)."""
    torch.set_num_threads(args.threads)
    manifest = json.loads((ROOT / "src" / "distill" / "teachers" / f"{SHIPPED}.json").read_text())
    seeds = [0] if args.quick else [0, 1, 2]
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="distill-hinton-shipped-"))
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (root / "hinton_mnist_shipped_quick.json" if args.quick
                                           else ROOT / "benchmarks" / "results" / "hinton_mnist_shipped.json")
    base = [f"data.options.path={args.data}", f"threads={args.threads}",
            f"teacher.weights=shipped:{SHIPPED}", "teacher.train=null", "teacher.cache=null",
            "data.augment.crop_padding=0", "data.views=null", f"seeds={seeds}",
            f"pilot.temperatures={PILOT_TEMPERATURES}", "pilot.teacher_weights=[0.5,0.9]",
            "evaluate.latency=false"]
    if args.quick:
        base += ["data.train_subset=4000", "train.epochs=2", "pilot.temperatures=[1.0,20.0]",
                 "pilot.teacher_weights=[0.9]", "pilot.min_val_samples=100", "pilot.budget=1.0"]
    study = Study(root, base, args.verbose, args.resume)
    started = time.perf_counter()
    results, run_dir, _ = study.run("shipped", [])
    recipe = distill.load_recipe(str(run_dir / "recipe.yaml"))  # the pilot's choice written into it
    soft = next(t for t in recipe.distill.terms if t.loss == "kd")
    chosen = soft.params.get("temperature")
    study.add("teacher", f"teacher 1200-1200 (shipped {SHIPPED})", results, "teacher", run_dir,
              model="hinton-teacher", temperature=None, augment="jitter (240 fresh epochs)", seeds=None)
    study.rows[-1]["train_seconds"] = manifest["train_cpu_seconds"]
    study.add("paper-baseline", "student 800-800 alone, no jitter (paper's baseline)", results, "baseline",
              run_dir, model="hinton-student", temperature=None, augment="none", seeds=seeds)
    study.add("distilled-pilot", f"student 800-800 distilled, no jitter, T = {chosen:g} (pilot)", results,
              "student", run_dir, model="hinton-student", temperature=chosen, augment="none", seeds=seeds)
    pilot = json.loads((run_dir / "pilot.json").read_text())
    distilled = study.rows[-1]
    per_student_minutes = distilled["train_seconds"] / len(seeds) / 60
    wall = time.perf_counter() - started
    record = {
        "benchmark": "Hinton, Vinyals & Dean (2015), MNIST, with the shipped teacher: student without jitter, "
                     "temperature chosen on validation",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "quick": args.quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(wall, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average": list(os.getloadavg())},
        "teacher": {"name": SHIPPED, "test_errors": errors(manifest["test_accuracy_fp16"]),
                    "cpu_hours": round(manifest["train_cpu_seconds"] / 3600, 2), "command": manifest["command"],
                    "train": manifest["train"]},
        "settings": {"recipe": PRESET, "overrides": base, "student_train": recipe.train.model_dump(mode="json"),
                     "distill_terms": [t.model_dump(mode="json") for t in recipe.distill.terms]},
        "pilot": {"summary": pilot["summary"], "chosen": pilot["chosen"], "trials": pilot["trials"],
                  "val_samples": pilot["val_samples"], "seconds": pilot["seconds"]},
        "paper": {"teacher": 67, "student_alone": 146, "distilled": 74, "test_set": TEST_SIZE},
        "targets": {"distilled_errors_max": 74, "distilled_errors_stretch": 70, "student_train_cpu_minutes_max": 20},
        "summary": {"distilled_errors_mean": distilled["errors_mean"],
                    "student_train_cpu_minutes": round(per_student_minutes, 2),
                    "target_met": distilled["errors_mean"] <= 74 and per_student_minutes <= 20},
        "rows": study.rows,
        "runs": study.runs,
    }
    table = markdown(study.rows)
    write_record(out, record,
        f"`{record['command']}`: {wall:.0f} s wall, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, {record['date']}, load average {record['machine']['load_average']} "
        f"at the end.\n\nTeacher: shipped `{SHIPPED}`, {record['teacher']['test_errors']} test errors, "
        f"{record['teacher']['cpu_hours']} CPU hours to train (`{manifest['command']}`).\n\n"
        f"Pilot: {pilot['summary']}.\n\n{table}\n\n"
        f"Target: distilled <= 74 test errors (the paper; stretch 70) with <= 20 CPU minutes of student training: "
        f"{record['summary']['distilled_errors_mean']:.1f} errors, {per_student_minutes:.1f} CPU minutes per "
        f"student: {'met' if record['summary']['target_met'] else 'missed'}.")
    print(table)
    print(f"results: {out}")
    return 0


def write_record(out: Path, record: dict, body: str) -> None:
    """The results JSON at ``out`` and a markdown page beside it: the benchmark's title, then ``body``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# {record['benchmark']}\n\n{body}\n")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | params | T | seeds | test errors (of 10,000) | paper | accuracy % | agreement % | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = f"{r['errors_mean']:.1f} ± {r['errors_std']:.1f}" if r["errors_std"] is not None else f"{r['errors_mean']:.0f}"
        if len(r["errors_per_seed"]) > 1:
            errs += f" ({', '.join(str(e) for e in r['errors_per_seed'])})"
        agreement = r["agreement_with_teacher"]
        lines.append("| " + " | ".join([
            r["label"], f"{r['params']:,}", f"{r['temperature']:g}" if r["temperature"] else "–",
            ",".join(str(s) for s in r["seeds"]) if r["seeds"] else "0",
            errs, str(r["paper_errors"]) if r["paper_errors"] is not None else "–",
            f"{100 * r['accuracy']:.2f}", f"{100 * agreement:.2f}" if agreement is not None else "–",
            f"{r['train_seconds']:.0f}",
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
