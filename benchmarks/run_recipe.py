"""Benchmark: run a recipe end to end and record its results and wall time.

    python benchmarks/run_recipe.py demo --out benchmarks/results/demo.json
    python benchmarks/run_recipe.py mnist --set data.options.path=../shared/data/mnist \
        --out benchmarks/results/mnist.json

Writes the run's ``results.json`` plus the wall time, the machine and the thread count to
``--out``; the run directory itself goes to a temporary folder unless ``--run-dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.pipeline import free_cores, run_recipe
from distill.recipes import load_recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="distill-bench-")) / "run"
    started = time.perf_counter()
    results = run_recipe(recipe, run_dir, data_dir=args.data_dir, overwrite=True, progress=False)
    wall = time.perf_counter() - started
    record = {
        "command": "python " + " ".join(sys.argv),
        "wall_seconds": round(wall, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores_free": free_cores(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "results": results.to_json(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{recipe.name}: {wall:.1f} s; {results['verdict']}")
    for role in ("teacher", "baseline", "student"):
        if role in results:
            r = results[role]
            print(f"  {role:9s} {100 * r['accuracy']:6.2f} ± {100 * r.get('accuracy_std', 0):.2f}  "
                  f"params {r['params']:,}  latency {r.get('latency_ms', float('nan')):.3f} ms")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
