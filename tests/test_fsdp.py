"""A sharded student (``train.sharding=fsdp``): two CPU processes (gloo) shard it and end with the
same weights as one process with the same global batch; each held about half of it while training,
the teacher whole; checkpoints resume on two processes or one; the model comes back plain."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill import TrainConfig, Trainer
from distill.errors import DistillError

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker
from test_ddp import run  # the DDP test's launcher: PYTHONPATH, one thread, a timeout

# FSDP reduce-scatters the averaged gradients, where one process sums them: equal up to rounding
TOLERANCE = 1e-5
EPOCHS = 3  # 24 steps


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: one process (sharding asked for, nothing to shard across)."""
    out = tmp_path_factory.mktemp("one")
    report = fsdp_worker.main(out, 1, EPOCHS)
    return out, report


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(fsdp_worker.__file__)), str(out), "2", str(EPOCHS)], out)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_sharded_processes_match_one(one, two):
    (one_dir, single), (two_dir, ranks) = one, two
    assert max_difference(load_file(one_dir / "full.safetensors"), load_file(two_dir / "full.safetensors")) <= TOLERANCE
    for report in ranks:
        assert report["steps"] == EPOCHS * fsdp_worker.STEPS_PER_EPOCH
        assert report["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)  # the whole gradient's norm


def test_each_process_held_half_of_the_student_and_all_of_the_teacher(two):
    _, ranks = two
    for report in ranks:
        assert report["kind"] == "DistributedType.FSDP" and report["all_sharded"], report
        low, high = report["held"]
        assert 0.4 < low <= high < 0.6, report["held"]
        assert report["teacher_whole"]
    assert sum(r["held"][0] for r in ranks) == pytest.approx(1.0)  # the shards cover the model once


def test_the_model_comes_back_plain_and_the_next_fit_is_unsharded(two):
    _, ranks = two
    for report in ranks:
        assert report["plain_after_fit"] and report["plain_after_resume"] and report["student_runs_alone"]
        assert report["kind_after"] == "DistributedType.MULTI_CPU" and not report["sharded_after"]


def test_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(one, two, tmp_path):
    (one_dir, _), (two_dir, _) = one, two
    full = load_file(one_dir / "full.safetensors")
    assert max_difference(full, load_file(two_dir / "resumed.safetensors")) <= TOLERANCE
    (tmp_path / "run").mkdir()
    shutil.copy(two_dir / "stopped.pt", tmp_path / "run" / "checkpoint.pt")
    loader, _, distiller = fsdp_worker.build()
    history = Trainer(distiller, loader, fsdp_worker.config(EPOCHS), run_dir=tmp_path / "run").fit(resume=True)
    assert [row["epoch"] for row in history] == [1, 2, 3]  # two from the checkpoint, the last one trained here
    assert max_difference(full, distiller.state_dict()) <= TOLERANCE


def test_sharding_is_a_train_option_with_two_values():
    assert TrainConfig().sharding == "none" and TrainConfig(sharding="fsdp").sharding == "fsdp"
    with pytest.raises(ValueError, match="sharding"):
        TrainConfig(sharding="zero3")


def test_sharding_with_a_deepspeed_launch_is_refused(monkeypatch):
    from types import SimpleNamespace

    from distill import trainer

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(trainer, "distributed_state", lambda cpu=False: SimpleNamespace(num_processes=2))
    with pytest.raises(DistillError, match="DeepSpeed"):
        trainer.shards(TrainConfig(sharding="fsdp"))
    monkeypatch.setattr(trainer, "distributed_state", lambda cpu=False: SimpleNamespace(num_processes=1))
    assert not trainer.shards(TrainConfig(sharding="fsdp"))  # one process: nothing to shard across


def test_shard_units_are_the_called_parts_and_the_blocks_of_layer_stacks():
    from torch import nn

    from distill.sharding import shard_units

    blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    student = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    student.blocks = blocks
    root = nn.Module()
    root.student = student
    root.adapters = nn.ModuleDict({"hint": nn.Linear(4, 8), "empty": nn.ReLU()})
    units = shard_units(root)
    assert units[-2:] == [student, root.adapters["hint"]]  # the parts last (bottom-up), containers looked through
    inner = {id(m) for m in units[:-2]}
    assert inner == {id(student[0]), id(student[2]), id(student[2][0]), id(student[2][1]), *map(id, blocks)}
    depth = [next(n for n, m in root.named_modules() if m is u).count(".") for u in units[:-1]]
    assert depth == sorted(depth, reverse=True)  # a part's deepest first, itself last, as fully_shard needs
    assert root.adapters["empty"] not in units  # no parameters, nothing to shard
