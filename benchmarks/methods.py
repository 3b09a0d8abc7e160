"""Benchmark: every distillation method on the same work, one table.

    python benchmarks/methods.py --data ../shared/data/fashion-mnist \
        --out benchmarks/results/methods.json --markdown docs/methods.md

Fashion-MNIST, a convolutional teacher (``cnn`` width 32, depth 3: 32-64-128 channels, 94k
parameters) and a much smaller convolutional student (``cnn`` width 8, depth 3: 8-16-32 channels,
6.3k parameters, 15x fewer). Every method is a recipe (``method_recipe``) run by
``distill.run_recipe``: the student over ``--seeds``, mean ± std of test accuracy, agreement with
the teacher and wall time. The teacher is trained once and cached once with every tap the methods
read (``block1..3`` and ``pool``), so the methods differ only in their terms. Methods run in
``--workers`` processes with one thread each.

Feature and relation methods are combined with cross-entropy (weight 1) and their loss weight β
from the CRD repository (Tian et al. 2020), as in the CRD paper's Table 1 (no KD term); the
logit methods follow their own papers. The β values were tuned for CIFAR-100 ResNets, not for
this pair: the table compares methods at their published settings, not tuned ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

BLOCKS = ["block1", "block2", "block3"]
CRD_NEGATIVES = 512
KD = [{"name": "ce", "loss": "ce", "weight": 0.1},
      {"name": "kd", "loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]


def _ce(*terms: dict) -> list[dict]:
    return [{"name": "ce", "loss": "ce", "weight": 1.0}, *terms]


def _per_block(loss: str, weight: float, **params) -> list[dict]:
    return [{"name": f"{loss}{i + 1}", "loss": loss, "weight": weight, "student": b, "teacher": b,
             **({"params": params} if params else {})} for i, b in enumerate(BLOCKS)]


def methods(epochs: int) -> dict[str, dict]:
    """name -> {"terms": [...], plus stage/recipe extras, "group", "cite"}."""
    warm = max(1.0, round(epochs * 20 / 240, 2))  # DKD warms up 20 of 240 epochs
    return {
        "KD": {"group": "logits", "cite": "Hinton et al. 2015", "terms": KD},
        "DKD": {"group": "logits", "cite": "Zhao et al. 2022", "terms": _ce(
            {"name": "dkd", "loss": "dkd", "weight": 1.0, "warmup_epochs": warm,
             "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}})},
        "DIST": {"group": "logits", "cite": "Huang et al. 2022", "terms": _ce(
            {"name": "dist", "loss": "dist", "weight": 1.0, "params": {"beta": 2.0, "gamma": 2.0, "temperature": 4.0}})},
        "KD + logit std.": {"group": "logits", "cite": "Sun et al. 2024", "terms": [
            {"name": "ce", "loss": "ce", "weight": 0.1},
            {"name": "kd_std", "loss": "kd_std", "weight": 0.9}]},
        "Tf-KD (no teacher)": {"group": "logits", "cite": "Yuan et al. 2020", "terms": _ce(
            {"name": "tf_kd", "loss": "tf_kd", "weight": 1.0})},
        "FitNets": {"group": "features", "cite": "Romero et al. 2015", "terms": _ce(
            {"name": "hint", "loss": "hint", "weight": 100.0, "student": "block2", "teacher": "block2"})},
        "AT": {"group": "features", "cite": "Zagoruyko & Komodakis 2017", "terms": _ce(*_per_block("at", 1000.0))},
        "NST": {"group": "features", "cite": "Huang & Wang 2017", "terms": _ce(*_per_block("nst", 50.0))},
        # our fsp sums over the C1 x C2 matrix entries (the paper's Eq. 2); the CRD code's β = 50
        # is for their mean over entries, hence one term per pair weighted 50 / (C1 C2)
        "FSP": {"group": "features", "cite": "Yim et al. 2017", "terms": _ce(
            {"name": "fsp12", "loss": "fsp", "weight": 50.0 / (32 * 64),
             "student": ["block1", "block2"], "teacher": ["block1", "block2"]},
            {"name": "fsp23", "loss": "fsp", "weight": 50.0 / (64 * 128),
             "student": ["block2", "block3"], "teacher": ["block2", "block3"]})},
        "VID": {"group": "features", "cite": "Ahn et al. 2019", "terms": _ce(*_per_block("vid", 1.0))},
        "ReviewKD": {"group": "features", "cite": "Chen et al. 2021", "terms": _ce(
            {"name": "reviewkd", "loss": "reviewkd", "weight": 1.0, "student": BLOCKS, "teacher": BLOCKS})},
        "SP": {"group": "relations", "cite": "Tung & Mori 2019", "terms": _ce(
            {"name": "sp", "loss": "sp", "weight": 3000.0, "student": "block3", "teacher": "block3"})},
        "RKD": {"group": "relations", "cite": "Park et al. 2019", "terms": _ce(
            {"name": "rkd", "loss": "rkd", "weight": 1.0, "student": "pool", "teacher": "pool"})},
        "PKT": {"group": "relations", "cite": "Passalis & Tefas 2018", "terms": _ce(
            {"name": "pkt", "loss": "pkt", "weight": 30000.0, "student": "pool", "teacher": "pool"})},
        "CC": {"group": "relations", "cite": "Peng et al. 2019", "terms": _ce(
            {"name": "cc", "loss": "cc", "weight": 0.02, "student": "pool", "teacher": "pool"})},
        # 512 negatives instead of the paper's 16384: gathering 16384 x 128 memory rows per sample
        # took 770 s per epoch here on one CPU thread (the paper's ablation still gains at 4096)
        "CRD": {"group": "contrastive", "cite": "Tian et al. 2020", "terms": _ce(
            {"name": "crd", "loss": "crd", "weight": 0.8, "student": "pool", "teacher": "pool",
             "params": {"nce_k": CRD_NEGATIVES}})},
        "CRD + KD": {"group": "contrastive", "cite": "Tian et al. 2020", "terms": [
            {"name": "kd", "loss": "kd", "weight": 1.0, "params": {"temperature": 4.0}},
            {"name": "crd", "loss": "crd", "weight": 0.8, "student": "pool", "teacher": "pool",
             "params": {"nce_k": CRD_NEGATIVES}}]},
        "Ensemble KD (2 teachers)": {"group": "several teachers", "cite": "average of logits", "terms": KD,
                                     "ensemble": True},
        "TA chain (KD)": {"group": "several teachers", "cite": "Mirzadeh et al. 2020", "terms": KD,
                          "assistants": [{"model": "cnn", "kwargs": {"width": 16, "depth": 3}}]},
        "Born-again, 2 gen. (KD)": {"group": "several teachers", "cite": "Furlanello et al. 2018", "terms": KD,
                                    "stage": {"generations": 2}},
        "DML, 2 peers (no teacher)": {"group": "several teachers", "cite": "Zhang et al. 2018", "terms": _ce(
            {"name": "kd", "loss": "kd", "weight": 1.0, "params": {"temperature": 1.0}}), "stage": {"peers": 2}},
    }


def base_recipe(args) -> dict:
    return {
        "name": "methods",
        "seeds": list(args.seeds),
        "threads": 1,
        "data": {"name": "fashion-mnist", "options": {"path": args.data}, "seed": 0,
                 "train_subset": args.train_subset, "eval_batch_size": 1000},
        "teacher": {"model": "cnn", "kwargs": {"width": 32, "depth": 3}},
        "student": {"model": "cnn", "kwargs": {"width": 8, "depth": 3}},
        "train": {"epochs": args.epochs, "optimizer": "adam", "lr": 0.002, "batch_size": 128,
                  "schedule": "cosine", "tensorboard": False, "checkpoint_every": args.epochs},
        "baseline": {"enabled": False},
        "distill": {"terms": KD},
        "evaluate": {"latency": False},
    }


def method_recipe(args, name: str, spec: dict, teacher: str, member: str, cache: str, ens_cache: str) -> dict:
    recipe = base_recipe(args)
    recipe["name"] = name
    recipe["teacher"].update(weights=teacher, cache=cache)
    recipe["distill"] = {"terms": copy.deepcopy(spec["terms"]), **spec.get("stage", {})}
    if spec.get("ensemble"):
        recipe["teacher"]["ensemble"] = {"members": [{"model": "cnn", "kwargs": {"width": 16, "depth": 3},
                                                      "weights": member}]}
        recipe["teacher"]["cache"] = ens_cache
    if spec.get("assistants"):
        recipe["assistants"] = spec["assistants"]
    return recipe


def _finished(name: str, recipe: dict, run_dir: str) -> dict | None:
    """The result of an earlier run of exactly this recipe in ``run_dir`` (``--resume``)."""
    from distill.recipes import load_recipe, recipe_to_yaml

    folder = Path(run_dir)
    if not (folder / "results.json").exists() or not (folder / "recipe.yaml").exists():
        return None
    import yaml

    # compared after validation, so fields added to the schema since (with defaults) do not count
    if recipe_to_yaml(load_recipe(yaml.safe_load((folder / "recipe.yaml").read_text()))) != recipe_to_yaml(load_recipe(recipe)):
        return None
    job = folder / "job.json"  # wall time; older runs: from the files' times
    seconds = (json.loads(job.read_text())["seconds"] if job.exists()
               else (folder / "results.json").stat().st_mtime - (folder / "recipe.yaml").stat().st_mtime)
    return {"name": name, "seconds": seconds, "results": json.loads((folder / "results.json").read_text()),
            "resumed": True}


def _job(name: str, recipe: dict, run_dir: str, resume: bool = False) -> dict:
    """One recipe in a worker process (one thread)."""
    if resume and (done := _finished(name, recipe, run_dir)) is not None:
        return done
    torch.set_num_threads(1)
    from distill.pipeline import run_recipe
    from distill.recipes import load_recipe

    started = time.perf_counter()
    results = run_recipe(load_recipe(recipe), run_dir, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    (Path(run_dir) / "job.json").write_text(json.dumps({"seconds": seconds}))
    return {"name": name, "seconds": seconds, "results": results.to_json()}


def _teacher_recipe(args, width: int, epochs: int, seed: int) -> dict:
    recipe = base_recipe(args)
    recipe["seeds"] = [seed]
    recipe["teacher"] = {"model": "cnn", "kwargs": {"width": width, "depth": 3},
                         "train": {**recipe["train"], "epochs": epochs, "checkpoint_every": epochs}}
    recipe["distill"]["enabled"] = False
    return recipe


def build_caches(args, work: Path, teacher_path: str, member_path: str) -> tuple[str, str]:
    from distill.cache import build_cache
    from distill.ensemble import TeacherEnsemble
    from distill.tasks.classification import build_model, prepare_data, train_loader
    from distill.recipes import load_recipe

    data = base_recipe(args)
    data["teacher"]["weights"] = teacher_path
    recipe = load_recipe(data)
    prepared = prepare_data(recipe, None)
    loader = train_loader(recipe, prepared, 500, 0)
    teacher = build_model(recipe.teacher, prepared.data, 0)
    member = build_model(recipe.teacher.model_copy(update={"kwargs": {"width": 16, "depth": 3},
                                                           "weights": member_path}), prepared.data, 0)
    cache, ens_cache = work / "teacher-cache", work / "ensemble-cache"
    build_cache(teacher, loader, cache, taps=[*BLOCKS, "pool"])
    build_cache(TeacherEnsemble([teacher, member]), loader, ens_cache)
    return str(cache), str(ens_cache)


def summarise(row: dict, kd: dict | None) -> dict:
    s = row["results"].get("student") or row["results"].get("baseline")
    out = {
        "method": row["name"], "accuracy": s["accuracy"], "accuracy_std": s["accuracy_std"],
        "per_seed": s["per_seed"]["accuracy"], "agreement": s["agreement"], "agreement_std": s["agreement_std"],
        "seconds": round(row["seconds"], 1),
    }
    for key in ("assistants", "generations"):
        if key in row["results"]:
            out[key] = row["results"][key]
    if kd is not None:
        pooled = ((s["accuracy_std"] ** 2 + kd["accuracy_std"] ** 2) / 2) ** 0.5
        out["vs_kd_points"] = 100 * (s["accuracy"] - kd["accuracy"])
        out["vs_kd_std_units"] = (s["accuracy"] - kd["accuracy"]) / pooled if pooled > 0 else None
    return out


# CRD's Table 1 (Tian et al. 2020), resnet32x4 -> resnet8x4 on CIFAR-100, top-1 %, by this table's names
CRD_TABLE1 = {"student alone": 72.50, "KD": 73.33, "FitNets": 73.50, "AT": 73.44, "SP": 72.94, "CC": 72.97,
              "VID": 73.09, "RKD": 71.90, "PKT": 73.64, "FSP": 72.62, "NST": 73.30, "CRD": 75.51, "CRD + KD": 75.46}


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def crd_rank_correlation(record: dict) -> dict:
    """Spearman's rank correlation between this table's accuracies and CRD's Table 1 over the entries
    both have (the student alone included), with both orderings."""
    ours = {r["method"]: 100 * r["accuracy"] for r in [record["baseline"], *record["methods"]]}
    shared = [name for name in CRD_TABLE1 if name in ours]
    a, b = _ranks([ours[n] for n in shared]), _ranks([CRD_TABLE1[n] for n in shared])
    mean = (len(shared) + 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(a, b))
    spread = (sum((x - mean) ** 2 for x in a) * sum((y - mean) ** 2 for y in b)) ** 0.5
    return {
        "spearman": round(cov / spread, 3) if spread else None,
        "entries": len(shared),
        "ours_order": sorted(shared, key=lambda n: -ours[n]),
        "crd_order": sorted(shared, key=lambda n: -CRD_TABLE1[n]),
        "crd_table1": {n: CRD_TABLE1[n] for n in shared},
        "source": "Tian et al. 2020, Contrastive Representation Distillation, Table 1, resnet32x4 -> resnet8x4",
    }


def markdown(record: dict) -> str:
    t, b = record["teacher"], record["baseline"]
    lines = [
        "# Methods on Fashion-MNIST",
        "",
        f"Made by `{record['command']}` on {record['date']} ({record['machine']['processor']}, "
        f"{record['settings']['workers']} worker processes with 1 thread each; whole table "
        f"{record['wall_seconds'] / 60:.1f} min).",
        "",
        f"Teacher `cnn` width 32 ({t['params']:,} params): {100 * t['accuracy']:.2f}%. "
        f"Student `cnn` width 8 ({b.get('params', 0):,} params). {record['settings']['train_subset']:,} "
        f"training images, {record['settings']['epochs']} epochs (Adam, lr 0.002, cosine, batch 128), "
        f"mean ± std over seeds {record['settings']['seeds']}. Δ KD: accuracy minus KD's, in points and "
        "in units of the pooled seed std. Seconds: wall time of the method's whole row (all seeds).",
        "",
        "| method | group | accuracy % | agreement % | Δ KD (points) | Δ KD (std units) | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | | {100 * t['accuracy']:.2f} | 100 | | | {t.get('seconds', 0):.0f} |",
        f"| student alone | | {100 * b['accuracy']:.2f} ± {100 * b['accuracy_std']:.2f} | "
        f"{100 * b['agreement']:.2f} | {b.get('vs_kd_points', 0):+.2f} | {b.get('vs_kd_std_units') or 0:+.1f} | {b['seconds']:.0f} |",
    ]
    for row in record["methods"]:
        units = row.get("vs_kd_std_units")
        lines.append(
            f"| {row['method']} | {row['group']} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} | "
            f"{100 * row['agreement']:.2f} | {row.get('vs_kd_points', 0):+.2f} | "
            f"{'' if units is None else f'{units:+.1f}'} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/fashion-mnist")
    parser.add_argument("--out", default="benchmarks/results/methods.json")
    parser.add_argument("--markdown", default="docs/methods.md")
    parser.add_argument("--work", default="/tmp/distill-methods", help="run folders, caches, teachers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished rows, teachers and caches in --work made by the same recipes")
    parser.add_argument("--rank-correlation-only", action="store_true",
                        help="recompute the rank correlation with CRD's Table 1 in --out from its rows, nothing else")
    args = parser.parse_args()
    if args.rank_correlation_only:
        record = json.loads(Path(args.out).read_text())
        record["crd_table1"] = crd_rank_correlation(record)
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(json.dumps(record["crd_table1"], indent=2))
        return 0

    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"))
    # 1. the teacher, an ensemble member and the student alone, side by side
    first = {
        "teacher": pool.submit(_job, "teacher", _teacher_recipe(args, 32, args.teacher_epochs, 0), str(work / "teacher"),
                               args.resume),
        "member": pool.submit(_job, "member", _teacher_recipe(args, 16, args.teacher_epochs, 1), str(work / "member"),
                              args.resume),
    }
    first = {k: f.result() for k, f in first.items()}
    teacher_path = str(work / "teacher" / "teacher.safetensors")
    member_path = str(work / "member" / "teacher.safetensors")
    torch.set_num_threads(args.workers)
    if args.resume and (work / "teacher-cache").exists() and (work / "ensemble-cache").exists():
        cache, ens_cache = str(work / "teacher-cache"), str(work / "ensemble-cache")  # checked when opened
    else:
        cache, ens_cache = build_caches(args, work, teacher_path, member_path)
    print(f"teacher {100 * first['teacher']['results']['teacher']['accuracy']:.2f}%, caches built "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    table = methods(args.epochs)
    names = [n for n in table if args.only is None or n in args.only]
    baseline = base_recipe(args)
    baseline.update(teacher={"model": "cnn", "kwargs": {"width": 32, "depth": 3}, "weights": teacher_path},
                    baseline={"enabled": True}, distill={"enabled": False, "terms": KD})
    futures = {"student alone": pool.submit(_job, "student alone", baseline, str(work / "baseline"), args.resume)}
    for name in names:
        recipe = method_recipe(args, name, table[name], teacher_path, member_path, cache, ens_cache)
        folder = work / f"m{list(table).index(name):02d}"  # stable: the method's place in the full table
        futures[name] = pool.submit(_job, name, recipe, str(folder), args.resume)
    done = {}
    for name, future in futures.items():
        done[name] = future.result()
        print(f"{name}: {done[name]['seconds']:.0f} s{' (earlier run)' if done[name].get('resumed') else ''}",
              flush=True)
    pool.shutdown()

    teacher = first["teacher"]["results"]["teacher"]
    base_row = summarise({"name": "student alone", "seconds": done["student alone"]["seconds"],
                          "results": {"baseline": done["student alone"]["results"]["baseline"]}}, None)
    base_row["params"] = done["student alone"]["results"]["baseline"]["params"]
    kd = summarise(done["KD"], None) if "KD" in done else None
    if kd is not None:
        base_row = summarise({"name": "student alone", "seconds": done["student alone"]["seconds"],
                              "results": {"baseline": done["student alone"]["results"]["baseline"]}}, kd)
        base_row["params"] = done["student alone"]["results"]["baseline"]["params"]
    rows = []
    for name in names:
        row = summarise(done[name], kd)
        row.update(group=table[name]["group"], cite=table[name]["cite"])
        rows.append(row)
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {"seeds": args.seeds, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "train_subset": args.train_subset, "workers": args.workers, "threads_per_worker": 1},
        "teacher": {**{k: teacher[k] for k in ("accuracy", "params")}, "seconds": round(first["teacher"]["seconds"], 1)},
        "ensemble_member": {k: first["member"]["results"]["teacher"][k] for k in ("accuracy", "params")},
        "baseline": base_row,
        "methods": rows,
        "recipes": {name: method_recipe(args, name, table[name], "TEACHER", "MEMBER", "CACHE", "ENSEMBLE_CACHE")
                    for name in names},
    }
    record["crd_table1"] = crd_rank_correlation(record)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
