"""Two CPU processes (gloo) give the same final weights as one process with the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
# DDP averages gradients in a different order than one process sums them: equal up to float rounding
TOLERANCE = 1e-5


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    e.pop("ACCELERATE_MIXED_PRECISION", None)
    return e


def run(cmd, tmp_path):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    run([sys.executable, str(WORKER), str(tmp / "one.safetensors"), "1"], tmp)
    return load_file(tmp / "one.safetensors")


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=TOLERANCE, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_accelerate_launch_two_processes_match_one(single, tmp_path):
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    # --multi_gpu is accelerate's data-parallel launcher; on a machine without CUDA distill joins
    # the processes into a gloo group on the CPU
    run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(WORKER), str(tmp_path / "two.safetensors"), "2"], tmp_path)
    assert_close(single, load_file(tmp_path / "two.safetensors"))


def test_torchrun_two_processes_match_one(single, tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path / "two.safetensors"), "2"], tmp_path)
    assert_close(single, load_file(tmp_path / "two.safetensors"))
