"""Does distillation beat training alone, with what a user gets by default?

    python benchmarks/wins.py [ROW ...] [--data-root ../shared/data] [--seeds 0,1,2,3,4] [--threads 1]
                              [--work benchmarks/runs/wins] [--quick]

Each row is one data set, one shipped teacher (``teacher.weights: shipped:NAME``, made by ``benchmarks/teachers.py``)
and one student about 4x or about 15x smaller, run by ``distill run`` with the default path: the
README example's objective (CE 0.1 + KD 0.9 at T 1) **and the pilot** (``pilot:`` with its
defaults: a quarter of the run's budget, on a validation split carved from the training data,
choosing T in {1, 2, 4} and the teacher's weight in {0.5, 0.9}). The student alone gets the same
schedule, data and augmentation. Regimes:

- ``same-data``: teacher and students trained on the same labelled training split;
- ``transfer``: the teacher was trained on the whole training split; the students have the labels
  of only ``labelled`` samples (``data.labelled``; the pilot's validation split is carved from
  them), and the rest of the training split is an unlabelled transfer set that only the distilled
  student's teacher terms read (a user with a pre-trained teacher and few labels). The student
  alone trains on its labelled samples for the same number of epochs (so fewer steps).

Results go to ``benchmarks/results/wins.json`` and ``wins.md``, row by row (rows already there are
kept, so rows can be run in separate sessions). Targets: on every ~4x row the distilled student
beats the student alone by more than 2 pooled standard deviations and closes at least a quarter of
the gap to the teacher (``gap_closed`` >= 0.25); on every ~15x row distilled >= alone.
``--quick`` (a few epochs, 2 seeds, small subsets) is a smoke test whose numbers mean nothing; it
writes to ``wins-quick.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = ROOT / "src" / "distill" / "teachers"

# the README example's objective: the starting point the pilot tunes
TERMS = [{"name": "hard", "loss": "ce", "weight": 0.1},
         {"name": "soft", "loss": "kd", "weight": 0.9, "params": {"temperature": 1.0}}]

MNIST1D = {"name": "mnist1d", "options": {"num_samples": 20000}, "augment": {"shift": 8}}
ROWS: dict[str, dict] = {
    "mnist1d-cnn32": {"dataset": "mnist1d", "regime": "transfer", "teacher": "mnist1d-cnn64",
                      "data": {**MNIST1D, "labelled": 2000},
                      "student": {"model": "cnn1d", "kwargs": {"width": 32}},
                      "train": {"epochs": 60, "optimizer": "adam", "lr": 0.003, "batch_size": 128}},
    "mnist1d-cnn14": {"dataset": "mnist1d", "regime": "transfer", "teacher": "mnist1d-cnn64",
                      "data": {**MNIST1D, "labelled": 2000},
                      "student": {"model": "cnn1d", "kwargs": {"width": 14}},
                      "train": {"epochs": 60, "optimizer": "adam", "lr": 0.003, "batch_size": 128}},
    "mnist-mlp512": {"dataset": "mnist", "regime": "transfer", "teacher": "mnist-hinton1200", "path": "mnist",
                     "data": {"name": "mnist", "labelled": 3000, "augment": {"crop_padding": 2}},
                     "student": {"model": "mlp", "kwargs": {"hidden": [512, 512]}},
                     "train": {"epochs": 30, "optimizer": "adam", "lr": 0.001, "batch_size": 128}},
    "mnist-mlp160": {"dataset": "mnist", "regime": "transfer", "teacher": "mnist-hinton1200", "path": "mnist",
                     "data": {"name": "mnist", "labelled": 3000, "augment": {"crop_padding": 2}},
                     "student": {"model": "mlp", "kwargs": {"hidden": [160, 160]}},
                     "train": {"epochs": 30, "optimizer": "adam", "lr": 0.001, "batch_size": 128}},
    "fashion-cnn8": {"dataset": "fashion-mnist", "regime": "same-data", "teacher": "fashion-cnn16",
                     "path": "fashion-mnist",
                     "data": {"name": "fashion-mnist", "augment": {"crop_padding": 2, "flip": True}},
                     "student": {"model": "cnn", "kwargs": {"width": 8, "depth": 3}},
                     "train": {"epochs": 20, "optimizer": "adam", "lr": 0.002, "batch_size": 128}},
    "fashion-cnn4": {"dataset": "fashion-mnist", "regime": "same-data", "teacher": "fashion-cnn16",
                     "path": "fashion-mnist",
                     "data": {"name": "fashion-mnist", "augment": {"crop_padding": 2, "flip": True}},
                     "student": {"model": "cnn", "kwargs": {"width": 4, "depth": 3}},
                     "train": {"epochs": 20, "optimizer": "adam", "lr": 0.002, "batch_size": 128}},
    "cifar10-cnn8": {"dataset": "cifar10", "regime": "same-data", "teacher": "cifar10-cnn16",
                     "path": "cifar10-jpg/cifar10-jpg.tar.gz",
                     "data": {"name": "cifar10", "augment": {"crop_padding": 4, "flip": True}},
                     "student": {"model": "cnn", "kwargs": {"width": 8, "depth": 3}},
                     "train": {"epochs": 20, "optimizer": "adam", "lr": 0.002, "batch_size": 128,
                               "channels_last": True}},  # 1.48x an epoch here (benchmarks/channels_last.py)
    "cifar10-cnn4": {"dataset": "cifar10", "regime": "same-data", "teacher": "cifar10-cnn16",
                     "path": "cifar10-jpg/cifar10-jpg.tar.gz",
                     "data": {"name": "cifar10", "augment": {"crop_padding": 4, "flip": True}},
                     "student": {"model": "cnn", "kwargs": {"width": 4, "depth": 3}},
                     "train": {"epochs": 20, "optimizer": "adam", "lr": 0.002, "batch_size": 128,
                               "channels_last": True}},
}


def teacher_manifest(name: str) -> dict:
    path = TEACHERS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"error: teacher {name} is not shipped yet: run python benchmarks/teachers.py {name}")
    return json.loads(path.read_text())


def recipe_for(row_id: str, args: argparse.Namespace) -> dict:
    row = ROWS[row_id]
    manifest = teacher_manifest(row["teacher"])
    data = json.loads(json.dumps(row["data"]))
    if row.get("path"):
        data.setdefault("options", {})["path"] = str((args.data_root / row["path"]).resolve())
    train = dict(row["train"])
    if args.quick:
        train["epochs"] = 4
        data["train_subset"] = 3000
    return {
        "name": f"wins-{row_id}",
        "seeds": args.seeds,
        "threads": args.threads,
        "data": data,
        "teacher": {"model": manifest["model"], "kwargs": manifest["kwargs"],
                    "weights": f"shipped:{row['teacher']}", "gate": {"enabled": False}},
        "student": row["student"],
        "train": train,
        "distill": {"terms": TERMS},
        "pilot": {"min_val_samples": 100, "budget": 1.0} if args.quick else {},
        "evaluate": {"latency_repeats": 20},
    }


def same_steps_recipe(row_id: str, args: argparse.Namespace, labelled: int, total: int) -> dict:
    """The transfer regime's second "alone": the student on its labelled samples for as many steps
    as the distilled student took over every sample (epochs scaled by total / labelled)."""
    data = recipe_for(row_id, args)
    data["name"] += "-alone-same-steps"
    data["train"]["epochs"] = round(data["train"]["epochs"] * total / labelled)
    data["distill"] = {"enabled": False, "terms": TERMS}
    data.pop("pilot")
    data["evaluate"] = {"latency": False}
    return data


def pooled(a: float, b: float) -> float:
    return math.sqrt((a * a + b * b) / 2)


def train_minutes(run_dir: Path) -> float:
    """Minutes of training the run's stages logged (every epoch of every stage; the pilot's trials are
    not logged and count in ``pilot_minutes``), with the extra student alone when there is one."""
    import csv

    seconds = 0.0
    for log in run_dir.glob("**/stages/*/metrics.csv"):
        with open(log) as f:
            seconds += sum(float(r["epoch_seconds"]) for r in csv.DictReader(f))
    return round(seconds / 60, 1)


def summarise(row_id: str, results: dict, run_dir: Path, threads: int, same_steps: dict | None = None) -> dict:
    row = ROWS[row_id]
    key = results.get("primary_metric", "accuracy")
    teacher, alone, dist = results["teacher"], results["baseline"], results["student"]
    t = 100 * teacher[key]
    a, a_std = 100 * alone[key], 100 * alone[f"{key}_std"]
    d, d_std = 100 * dist[key], 100 * dist[f"{key}_std"]
    alone_arms = {"alone": (a, a_std)}
    if same_steps is not None:  # the stronger of the two students alone is the one to beat
        s_mean, s_std = 100 * same_steps["baseline"][key], 100 * same_steps["baseline"][f"{key}_std"]
        alone_arms["alone_same_steps"] = (s_mean, s_std)
        if s_mean > a:
            a, a_std = s_mean, s_std
    gain = d - a
    spread = pooled(a_std, d_std)
    compression = teacher["params"] / dist["params"]
    band = "4x" if compression < 8 else "15x"
    gap = t - a
    closed = gain / gap if gap > 0 else float("nan")
    if band == "4x":
        met = gain > 2 * spread and closed >= 0.25
    else:
        met = d >= a
    pilot = results.get("pilot") or {}
    return {
        "row": row_id, "dataset": row["dataset"], "regime": row["regime"], "teacher": row["teacher"],
        "student": f"{row['student']['model']} {json.dumps(row['student'].get('kwargs', {}), separators=(',', ':'))}",
        "compression": round(compression, 2), "band": band,
        "teacher_params": teacher["params"], "student_params": dist["params"],
        "labelled": row["data"].get("labelled"),
        "teacher_acc": round(t, 2),
        "alone": {"mean": round(alone_arms["alone"][0], 2), "std": round(alone_arms["alone"][1], 2),
                  "per_seed": alone["per_seed"][key]},
        **({"alone_same_steps": {"mean": round(alone_arms["alone_same_steps"][0], 2),
                                 "std": round(alone_arms["alone_same_steps"][1], 2),
                                 "epochs": same_steps["epochs"],
                                 "per_seed": same_steps["baseline"]["per_seed"][key]}} if same_steps else {}),
        "compared_with": "alone_same_steps" if same_steps and alone_arms["alone_same_steps"][0] > alone_arms["alone"][0]
        else "alone",
        "distilled": {"mean": round(d, 2), "std": round(d_std, 2), "per_seed": dist["per_seed"][key]},
        "agreement": {"alone": alone.get("agreement"), "distilled": dist.get("agreement")},
        "gain_points": round(gain, 2), "pooled_std": round(spread, 2),
        "gap_closed": round(closed, 3) if math.isfinite(closed) else None,
        "target_met": bool(met),
        "pilot": {"chosen": pilot.get("chosen"), "beat_alone_on_validation": pilot.get("beat_alone"),
                  "epochs_per_trial": pilot.get("epochs")},
        "verdict": results.get("verdict"),
        "seeds": results["seeds"],
        "cpu_minutes": round((train_minutes(run_dir) + (pilot.get("seconds") or 0) / 60) * threads, 1),
        "train_minutes": train_minutes(run_dir),
        "pilot_minutes": round(pilot["seconds"] / 60, 1) if pilot.get("seconds") is not None else None,
        "threads": threads,
    }


def write(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    doc = {
        "benchmark": "wins",
        "command": "python benchmarks/wins.py " + " ".join(r["row"] for r in rows),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s); "
                   "another job shared the machine",
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "default_objective": TERMS,
        "rows": rows,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    lines = [
        "# Distilled vs the same student trained alone (default path: README objective + pilot)",
        "",
        f"`{doc['command']}`; {doc['machine']}; {doc['made']}. Test accuracy %, mean ± std over seeds "
        "(5 unless stated); the student alone has the same schedule, data and augmentation. Transfer rows also "
        "train the student alone for as many steps as the distilled student took; the gain and the gap closed "
        "are measured against the stronger of the two.",
        "",
        "| data | regime | teacher (acc) | student | compression | alone | alone, same steps | distilled | gain | "
        "2 pooled std | gap closed | pilot chose | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = (r["pilot"]["chosen"] or {}).get("label", "-")
        regime = r["regime"] + (f" ({r['labelled']} labels)" if r.get("labelled") else "")
        closed = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        alone, dist, steps = r["alone"], r["distilled"], r.get("alone_same_steps")
        same = f"{steps['mean']:.2f} ± {steps['std']:.2f} ({steps['epochs']} epochs)" if steps else "-"
        seeds = f" ({len(r['seeds'])} seeds)" if len(r["seeds"]) != 5 else ""
        lines.append(
            f"| {r['dataset']} | {regime} | {r['teacher']} ({r['teacher_acc']:.2f}) | {r['student']} "
            f"| {r['compression']:.1f}x | {alone['mean']:.2f} ± {alone['std']:.2f} | {same} "
            f"| {dist['mean']:.2f} ± {dist['std']:.2f}{seeds} | {r['gain_points']:+.2f} | {2 * r['pooled_std']:.2f} "
            f"| {closed} | {chosen} | {'met' if r['target_met'] else 'missed'} |")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out.with_suffix(".md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help=f"rows to run (default: all: {', '.join(ROWS)})")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "runs" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs" / "wins")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke test: numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.seeds = args.seeds[:2]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        print(f"error: unknown row {', '.join(unknown)}; rows: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    out = args.out or (args.work / "wins-quick.json" if args.quick else ROOT / "benchmarks" / "results" / "wins.json")
    import distill
    from distill.recipes import load_recipe

    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    for row_id in args.rows or list(ROWS):
        run_dir = args.work / (f"quick-{row_id}" if args.quick else row_id)
        resume = run_dir.exists() and any(run_dir.iterdir())
        results = distill.run_recipe(load_recipe(recipe_for(row_id, args)), run_dir, data_dir=args.data_dir,
                                     resume=resume, overwrite=not resume, progress=False)
        same_steps = None
        if ROWS[row_id]["regime"] == "transfer":
            labelled = ROWS[row_id]["data"]["labelled"]
            total = results["training_samples"]  # labelled and unlabelled
            extra = load_recipe(same_steps_recipe(row_id, args, labelled, total))
            extra_dir = run_dir / "alone-same-steps"
            again = extra_dir.exists() and any(extra_dir.iterdir())
            same_steps = distill.run_recipe(extra, extra_dir, data_dir=args.data_dir, resume=again, overwrite=not again,
                                            progress=False).to_json()  # a dict, to carry the epochs beside it
            same_steps["epochs"] = extra.train.epochs
        row = summarise(row_id, results, run_dir, args.threads, same_steps)
        kept = [r for r in kept if r["row"] != row_id] + [row]
        kept.sort(key=lambda r: list(ROWS).index(r["row"]))
        write(out, kept, args)
        alone = row[row["compared_with"]]
        print(f"{row_id}: alone ({row['compared_with']}) {alone['mean']:.2f} ± {alone['std']:.2f}, distilled "
              f"{row['distilled']['mean']:.2f} ± {row['distilled']['std']:.2f} ({row['gain_points']:+.2f}, "
              f"gap closed {row['gap_closed']}), target {'met' if row['target_met'] else 'missed'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
