"""Train the teachers the benchmarks and presets distil from, as long as it takes, and ship them.

    python benchmarks/teachers.py [NAME ...] [--data-root ../shared/data] [--work benchmarks/runs/teachers]
                                  [--threads 1] [--retrain]

Each teacher is trained by ``distill run`` itself (a recipe whose baseline and distilled stages are
off), on **fresh augmentation every epoch** (``data.views`` unset: no replayed views), with a
checkpoint every few epochs, so a killed job continues with ``--resume`` semantics: run the same
command again. When a teacher finishes, its weights are written to ``src/distill/teachers/NAME.safetensors``
in **fp16** with the SHA-256, the recipe, the command, the per-epoch log and the test accuracy in
``src/distill/teachers/NAME.json`` (the manifest :func:`distill.models.weights.shipped_teachers` reads; recipes load it as
``teacher.weights: shipped:NAME``). A finished teacher is
not trained again unless ``--retrain`` is given.

A teacher is trained on the whole training split of its data set (the students of the "transfer"
regime see only part of that split's labels; see ``benchmarks/wins.py``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (recipe without data path, data folder under --data-root, option that takes the path)
TEACHERS: dict[str, dict] = {
    "mnist-hinton1200": {
        "about": "MNIST, Hinton et al.'s 784-1200-1200-10 teacher (dropout), 240 epochs of fresh +-2 px jitter",
        "data": {"name": "mnist", "augment": {"crop_padding": 2}},
        "path": "mnist",
        # trained by `distill run hinton-mnist` (see ../shared/teachers/README.md for the command and log);
        # imported here: converted to fp16 and evaluated again
        "shared": "teachers/hinton-teacher-1200-1200",
        "teacher": {"model": "hinton-teacher",
                    "train": {"epochs": 240, "optimizer": "adam", "lr": 0.001, "batch_size": 256,
                              "mixed_precision": "bf16", "checkpoint_every": 20}},
    },
    "fashion-cnn16": {
        "about": "Fashion-MNIST, cnn width 16 depth 3, crop 2 + flip",
        "data": {"name": "fashion-mnist", "augment": {"crop_padding": 2, "flip": True}},
        "path": "fashion-mnist",
        "teacher": {"model": "cnn", "kwargs": {"width": 16, "depth": 3},
                    "train": {"epochs": 40, "optimizer": "adam", "lr": 0.002, "batch_size": 128,
                              "weight_decay": 0.0, "checkpoint_every": 2}},
    },
    "cifar10-cnn16": {
        "about": "CIFAR-10 (JPEG copy), cnn width 16 depth 3, crop 4 + flip",
        "data": {"name": "cifar10", "augment": {"crop_padding": 4, "flip": True}},
        "path": "cifar10-jpg/cifar10-jpg.tar.gz",
        "teacher": {"model": "cnn", "kwargs": {"width": 16, "depth": 3},
                    "train": {"epochs": 40, "optimizer": "adam", "lr": 0.002, "batch_size": 128,
                              "checkpoint_every": 2}},
    },
    "mnist1d-cnn64": {
        "about": "MNIST-1D (20,000 generated: 16,000 train / 4,000 test), cnn1d width 64, shift 8",
        "data": {"name": "mnist1d", "options": {"num_samples": 20000}, "augment": {"shift": 8}},
        "path": None,
        "teacher": {"model": "cnn1d", "kwargs": {"width": 64},
                    "train": {"epochs": 150, "optimizer": "adam", "lr": 0.003, "batch_size": 128,
                              "checkpoint_every": 10}},
    },
}


def recipe_for(name: str, data_root: Path | None, threads: int) -> dict:
    spec = TEACHERS[name]
    data = json.loads(json.dumps(spec["data"]))
    if spec["path"] is not None and data_root is not None:
        data.setdefault("options", {})["path"] = str((data_root / spec["path"]).resolve())
    teacher = json.loads(json.dumps(spec["teacher"]))
    teacher["gate"] = {"enabled": False}
    return {
        "name": f"teacher-{name}",
        "seeds": [0],
        "threads": threads,
        "data": data,
        "teacher": teacher,
        "student": {"model": teacher["model"], "kwargs": teacher.get("kwargs", {})},
        "baseline": {"enabled": False},
        "distill": {"enabled": False, "terms": [{"loss": "ce"}]},
        "evaluate": {"latency": False},
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_fp16(name: str, weights: Path, args: argparse.Namespace) -> float:
    """The test score of the shipped fp16 file itself (loaded into the fp32 model)."""
    import distill
    from distill.recipes.loader import load_recipe

    data = recipe_for(name, args.data_root, args.threads)
    data["teacher"] = {**data["teacher"], "weights": str(weights)}
    results = distill.run_recipe(load_recipe(data), args.work / f"{name}-fp16", data_dir=args.data_dir,
                                 overwrite=True, progress=False)
    return results["teacher"][results.get("primary_metric", "accuracy")]


def train(name: str, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    import distill
    from distill.recipes.loader import load_recipe

    out_dir = ROOT / "src" / "distill" / "teachers"  # shipped with the package: `teacher.weights: shipped:NAME`
    manifest_path = out_dir / f"{name}.json"
    if manifest_path.exists() and not args.retrain:
        manifest = json.loads(manifest_path.read_text())
        key = next(k for k in manifest if k.startswith("test_"))
        if key + "_fp16" not in manifest:  # made before the fp16 file was evaluated on its own
            manifest[key + "_fp16"] = evaluate_fp16(name, out_dir / manifest["file"], args)
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{name}: done already ({manifest_path}); --retrain trains it again")
        return manifest
    recipe_dict = recipe_for(name, args.data_root, args.threads)
    shared = TEACHERS[name].get("shared")
    if shared is not None:  # trained elsewhere by the project's CLI: evaluate the given weights, train nothing
        source = args.data_root.parent / f"{shared}.safetensors"
        recipe_dict["teacher"] = {**recipe_dict["teacher"], "weights": str(source.resolve())}
    recipe = load_recipe(recipe_dict)
    run_dir = args.work / name
    resume = run_dir.exists() and any(run_dir.iterdir()) and not args.retrain
    print(f"{name}: {TEACHERS[name]['about']} -> {run_dir} ({'resuming' if resume else 'new'})", flush=True)
    start = time.time()
    results = distill.run_recipe(recipe, run_dir, data_dir=args.data_dir, resume=resume,
                                 overwrite=not resume, progress=args.progress)
    wall = time.time() - start
    log = run_dir / "stages" / "teacher" / "metrics.csv"
    if shared is not None:
        log = args.data_root.parent / f"{shared}.metrics.csv"
        state_source = Path(recipe_dict["teacher"]["weights"])
    else:
        state_source = run_dir / "teacher.safetensors"
    with open(log) as f:
        rows = list(csv.DictReader(f))
    train_seconds = sum(float(r["epoch_seconds"]) for r in rows)
    state = load_file(str(state_source))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out_dir.mkdir(exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(half, str(tmp))
    os.replace(tmp, weights)
    shutil.copyfile(log, out_dir / f"{name}.metrics.csv")
    key = results.get("primary_metric", "accuracy")
    manifest = {
        "name": name,
        "about": TEACHERS[name]["about"],
        "file": weights.name,
        "sha256": sha256_of(weights),
        "dtype": "fp16",
        "bytes": weights.stat().st_size,
        "model": recipe_dict["teacher"]["model"],
        "kwargs": recipe_dict["teacher"].get("kwargs", {}),
        "data": {k: v for k, v in recipe_dict["data"].items() if k != "options"}
        | {"options": {k: v for k, v in recipe_dict["data"].get("options", {}).items() if k != "path"}},
        "train": recipe_dict["teacher"]["train"],
        "test_" + key: results["teacher"][key],
        "epochs_logged": len(rows),
        "train_cpu_seconds": round(train_seconds, 1),
        "wall_seconds_this_call": round(wall, 1),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python benchmarks/teachers.py " + name + " --data-root ../shared/data --threads "
        + str(args.threads),
        "source": f"../shared/{shared}.safetensors (its README: the `distill run hinton-mnist` command)" if shared else None,
        "log": f"{name}.metrics.csv",
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    manifest["test_" + key + "_fp16"] = evaluate_fp16(name, weights, args)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    print(f"{name}: test {key} {100 * results['teacher'][key]:.2f}% after {len(rows)} epochs, "
          f"{train_seconds / 60:.1f} min of training", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"teachers to train (default: all: {', '.join(TEACHERS)})")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "runs" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "runs" / "teachers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--retrain", action="store_true", help="train again even when finished")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in TEACHERS]
    if unknown:
        print(f"error: unknown teacher {', '.join(unknown)}; known: {', '.join(TEACHERS)}", file=sys.stderr)
        return 2
    for name in args.names or list(TEACHERS):
        train(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
