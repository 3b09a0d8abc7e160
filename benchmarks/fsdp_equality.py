"""Benchmark: a sharded student (``train.sharding=fsdp``) on N CPU processes against one process.

    python benchmarks/fsdp_equality.py [--epochs 3] [--processes 2] [--launcher torchrun|accelerate] [--out F.json]

Runs ``tests/fsdp_worker.py`` (a student, a live frozen teacher, hard labels + KD + a hint term;
8 steps an epoch, windows of 2 accumulated steps) once as one process and once under the launcher
as N processes sharing a gloo group, with ``sharding: fsdp``, and reports the figure "max abs
weight difference, FSDP N-process vs 1-process, after N steps", the same for a run stopped one
epoch early and resumed from its checkpoint, and the share of the model each process held while
training. Prints the result as JSON (and writes it to ``--out`` when given).

From Python (e.g. ``benchmarks/lm_scale.py``, run from the repository)::

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fsdp_equality import measure
    figure = measure(epochs=3)["max_abs_weight_difference"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_worker.py"
STEPS_PER_EPOCH = 8  # tests/fsdp_worker.py: 256 samples, batches of 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, launcher: str, out: Path, epochs: int, timeout: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    args = [str(WORKER), str(out), str(processes), str(epochs)]
    if processes == 1:
        cmd = [sys.executable, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    elif launcher == "accelerate":
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use torchrun or accelerate")
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def _max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), (sorted(x), sorted(y))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def measure(epochs: int = 3, processes: int = 2, launcher: str = "torchrun", timeout: int = 600) -> dict:
    """The figures of one comparison (see the module); ``steps`` = 8 x ``epochs``."""
    with tempfile.TemporaryDirectory(prefix="fsdp-equality-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        one_seconds = _launch(1, launcher, one, epochs, timeout)
        many_seconds = _launch(processes, launcher, many, epochs, timeout)
        ranks = [json.loads((many / f"rank{r}.json").read_text()) for r in range(processes)]
        result = {
            "steps": STEPS_PER_EPOCH * epochs,
            "processes": processes,
            "launcher": launcher,
            "max_abs_weight_difference": _max_difference(one / "full.safetensors", many / "full.safetensors"),
            "held_share_per_process": [r["held"] for r in ranks],  # smallest and largest over the steps
            "every_parameter_sharded": all(r["all_sharded"] for r in ranks),
            "teacher_whole": all(r["teacher_whole"] for r in ranks),
            "seconds": {"one_process": round(one_seconds, 1), f"{processes}_processes": round(many_seconds, 1)},
        }
        if epochs > 1:  # stopped after epochs - 1, resumed from the checkpoint
            result["resumed_max_abs_weight_difference"] = _max_difference(
                one / "full.safetensors", many / "resumed.safetensors")
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="8 steps each (default 3: 24 steps)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--launcher", choices=("torchrun", "accelerate"), default="torchrun")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    result = measure(args.epochs, args.processes, args.launcher)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
