"""How does distillation's gain over training alone grow with the schedule? One wins row at several lengths.

    python benchmarks/schedule_curve.py ROW [--epochs 15,30,60,120] [--seeds 0,1,2] [--threads 1]
                                        [--data-root ../shared/data] [--work benchmarks/runs/curve] [--quick]

``ROW`` is a row of ``benchmarks/wins.py`` (its data, shipped teacher, student and optimiser). At
every schedule length the student alone and the distilled student train with the same schedule,
data and augmentation; the distilled student uses the settings the pilot chose for that row in
``benchmarks/results/wins.json`` (fixed here, so that only the schedule moves; without a wins
result, the README objective). Transfer rows also train the student alone for as many steps as the
distilled student took (``alone_same_steps``), and the gain is measured against the stronger of
the two, as in wins. Beyer et al. (2022, "Knowledge distillation: a good teacher is patient and
consistent") found the gain of function matching still growing after thousands of epochs; this
measures where it stands for distill's default path on this CPU.

Results go to ``benchmarks/results/schedule_curve.json`` and ``.md`` (``--out``), row by row
(rows already there are kept). ``--quick`` is a smoke test (2 short schedules, a subset, 2 seeds)
whose numbers mean nothing; it writes beside its run folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import wins  # noqa: E402  (the rows, their recipes and the summary rules)


def chosen_settings(row_id: str) -> dict:
    """The ``--set`` assignments the pilot chose for ``row_id`` in wins.json ({} without one)."""
    path = ROOT / "benchmarks" / "results" / "wins.json"
    if not path.exists():
        return {}
    for row in json.loads(path.read_text())["rows"]:
        if row["row"] == row_id:
            chosen = dict((row.get("pilot") or {}).get("chosen") or {})
            chosen.pop("label", None)
            return chosen
    return {}


def arm(results: dict, role: str) -> dict:
    values = [100 * v for v in results[role]["per_seed"]["accuracy"]]
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0, "per_seed": values}


def point(row_id: str, epochs: int, args: argparse.Namespace, settings: dict) -> dict:
    import distill
    from distill.recipes import load_recipe

    data = wins.recipe_for(row_id, args)
    data["train"]["epochs"] = epochs
    data.pop("pilot")
    data["evaluate"] = {"latency": False}
    data["name"] += f"-e{epochs}"
    overrides = [f"{k}={v}" for k, v in settings.items()]
    run_dir = args.work / row_id / f"e{epochs}"
    resume = run_dir.exists() and any(run_dir.iterdir())
    results = distill.run_recipe(load_recipe(data, overrides), run_dir, data_dir=args.data_dir, resume=resume,
                                 overwrite=not resume, progress=False)
    out = {"epochs": epochs, "alone": arm(results, "baseline"), "distilled": arm(results, "student"),
           "teacher_acc": round(100 * results["teacher"]["accuracy"], 2)}
    minutes = wins.train_minutes(run_dir)
    if wins.ROWS[row_id]["regime"] == "transfer":
        labelled = wins.ROWS[row_id]["data"]["labelled"]
        extra = wins.same_steps_recipe(row_id, args, labelled, results["training_samples"])
        extra["train"]["epochs"] = round(epochs * results["training_samples"] / labelled)
        extra_dir = run_dir / "alone-same-steps"
        again = extra_dir.exists() and any(extra_dir.iterdir())
        steps = distill.run_recipe(load_recipe(extra), extra_dir, data_dir=args.data_dir, resume=again,
                                   overwrite=not again, progress=False)
        out["alone_same_steps"] = {**arm(steps, "baseline"), "epochs": extra["train"]["epochs"]}
    best = max((k for k in ("alone", "alone_same_steps") if k in out), key=lambda k: out[k]["mean"])
    gain = out["distilled"]["mean"] - out[best]["mean"]
    spread = wins.pooled(out[best]["std"], out["distilled"]["std"])
    gap = out["teacher_acc"] - out[best]["mean"]
    out.update(compared_with=best, gain_points=round(gain, 2), pooled_std=round(spread, 2),
               gap_closed=round(gain / gap, 3) if gap > 0 else None,
               cpu_minutes=round(minutes * args.threads, 1))
    return out


def render(doc: dict) -> str:
    lines = ["# Gain of distillation against the schedule length", "",
             f"`{doc['command']}`; {doc['machine']}; {doc['made']}. Test accuracy %, mean ± std over seeds; "
             "each point trains the student alone and distilled with the same schedule; the distilled settings are "
             "the pilot's choice for the row in wins.json, fixed across lengths.", ""]
    for row_id, row in doc["rows"].items():
        lines += [f"## {row_id} ({row['regime']}; settings: {row['settings'] or 'README objective'})", "",
                  "| epochs | alone | alone, same steps | distilled | gain | 2 pooled std | gap closed | CPU min |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in row["points"]:
            steps = p.get("alone_same_steps")
            same = f"{steps['mean']:.2f} ± {steps['std']:.2f} ({steps['epochs']} ep.)" if steps else "-"
            closed = "-" if p["gap_closed"] is None else f"{p['gap_closed']:.2f}"
            lines.append(f"| {p['epochs']} | {p['alone']['mean']:.2f} ± {p['alone']['std']:.2f} | {same} "
                         f"| {p['distilled']['mean']:.2f} ± {p['distilled']['std']:.2f} | {p['gain_points']:+.2f} "
                         f"| {2 * p['pooled_std']:.2f} | {closed} | {p['cpu_minutes']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", choices=list(wins.ROWS))
    parser.add_argument("--epochs", default="15,30,60,120")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "runs" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs" / "curve")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: numbers mean nothing")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    lengths = [int(e) for e in args.epochs.split(",")]
    if args.quick:
        args.seeds, lengths = args.seeds[:2], [1, 2]
    out = args.out or (args.work / "schedule_curve_quick.json" if args.quick
                       else ROOT / "benchmarks" / "results" / "schedule_curve.json")
    doc = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    settings = chosen_settings(args.row)
    points = []
    for epochs in lengths:
        points.append(point(args.row, epochs, args, settings))
        p = points[-1]
        print(f"{args.row} {epochs} epochs: alone {p[p['compared_with']]['mean']:.2f}, distilled "
              f"{p['distilled']['mean']:.2f} ({p['gain_points']:+.2f})", flush=True)
        doc["rows"][args.row] = {"regime": wins.ROWS[args.row]["regime"], "settings": settings, "seeds": args.seeds,
                                 "points": points}
        doc.update(benchmark="schedule_curve", made=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                   command="python benchmarks/schedule_curve.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
                           f"load average {[round(x, 2) for x in os.getloadavg()]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, out)
        out.with_suffix(".md").write_text(render(doc) + "\n")
    assert all(math.isfinite(p["gain_points"]) for p in points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
