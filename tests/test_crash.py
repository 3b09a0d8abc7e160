"""Crash safety: a run killed with SIGKILL anywhere resumes to exactly the result of an
uninterrupted run, and no checkpoint or teacher cache is ever left half-written.

Real runs are killed at chosen places through the fault points of ``distill.checkpoints``
(``DISTILL_FAULT=checkpoint-write:N``, ``cache-write:N``, ``cache-install:N``,
``epoch-step:[NAME:]E:S``), in subprocesses on scikit-learn's digits with tiny MLPs.

The subprocesses run ``tests/fault_injection.py ARGS`` rather than ``distill ARGS``: the same
command line, with a trainer callback added to every fit that carries the ``epoch-step`` point
(the training loop has none of its own; see that file).
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distill.checkpoints as checkpoints
from distill.cache import TeacherCache
from distill.checkpoints import fault_point, load_checkpoint, save_checkpoint
from distill.cli import main
from distill.errors import DistillError

SRC = Path(__file__).resolve().parents[1] / "src"
FAULTS = Path(__file__).with_name("fault_injection.py")  # `distill ARGS`, with the epoch-step fault point

RECIPE = {
    "name": "crash",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits", "val_fraction": 0.1, "train_subset": 600},  # 540 train: 8 steps of 64
    "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "cache": "auto", "cache_dtype": "fp32",
                "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "tensorboard": False}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64, "tensorboard": False},
    "distill": {"terms": [{"name": "hard", "loss": "ce", "weight": 0.5},
                          {"name": "soft", "loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
                          {"name": "hint", "loss": "hint", "student": "act1", "teacher": "act1"}]},
    "evaluate": {"latency": False},
}
STAGES = ("teacher", "baseline-seed0", "student-seed0")


def victim(args: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in a subprocess that kills itself at ``fault``."""
    env = {**os.environ, "DISTILL_FAULT": fault, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(FAULTS), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])


def assert_nothing_half_written(out: Path) -> None:
    """Every checkpoint in place loads and verifies; a cache in place opens and verifies."""
    for path in out.glob("stages/*/checkpoint.pt"):
        load_checkpoint(path)
    if (out / "teacher-cache").exists():
        TeacherCache(out / "teacher-cache", verify=True)


def metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    weights = ["teacher.safetensors", "student.safetensors"] + [
        f"stages/{s}/student.safetensors" for s in STAGES if s != "teacher"]
    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    for stage in STAGES:
        rows = metrics(a / "stages" / stage / "metrics.csv")
        assert rows == metrics(b / "stages" / stage / "metrics.csv"), stage
        assert len(rows) == 2 and "grad_norm" in rows[0]
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(tmp / "recipe.yaml"), "--out", str(tmp / "whole"), "--quiet"]) == 0
    return tmp


def test_run_killed_three_times_resumes_to_the_uninterrupted_result(reference):
    recipe, out = str(reference / "recipe.yaml"), reference / "killed"
    run = ["run", recipe, "--out", str(out), "--quiet"]

    # 1. during the teacher's second checkpoint write, with half of the new file written
    assert_killed(victim(run, "checkpoint-write:2"))
    teacher = out / "stages" / "teacher"
    assert load_checkpoint(teacher / "checkpoint.pt")["epoch"] == 0  # the old one, intact
    partial = list(teacher.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (teacher / "checkpoint.pt").stat().st_size
    assert not (out / "teacher.safetensors").exists()
    assert_nothing_half_written(out)

    # 2. resumed, then killed while building the teacher cache (after 3 of its 9 batches)
    assert_killed(victim(run + ["--resume"], "cache-write:3"))
    assert not list(teacher.glob(".checkpoint.pt.*.tmp"))  # the next write removed the stale one
    assert (teacher / "result.json").exists() and not (out / "teacher-cache").exists()
    assert len(list(out.glob("teacher-cache.tmp-*"))) == 1
    with pytest.raises(DistillError, match="does not exist .*an interrupted build"):
        TeacherCache(out / "teacher-cache")
    assert_nothing_half_written(out)

    # 3. resumed, then killed mid-epoch: the distilled student's epoch 2, after its step 3
    assert_killed(victim(run + ["--resume"], "epoch-step:student-seed0:2:3"))
    student = out / "stages" / "student-seed0"
    assert load_checkpoint(student / "checkpoint.pt")["epoch"] == 0
    assert len(metrics(student / "metrics.csv")) == 1 and not (student / "result.json").exists()
    assert (out / "stages" / "baseline-seed0" / "result.json").exists()
    assert_nothing_half_written(out)

    # 4. resumed to the end: the same weights, metrics and results as the run never killed
    assert main(run + ["--resume"]) == 0
    assert_same_run(reference / "whole", out)
    assert not list(out.glob("stages/*/.*.tmp"))


def test_cache_replacement_killed_between_renames_is_named_and_rebuilt(reference):
    whole = reference / "whole"
    cache = reference / "cache"
    args = ["cache", str(reference / "recipe.yaml"), "--set", f"teacher.weights={whole / 'teacher.safetensors'}",
            "--out", str(cache)]
    assert main(args) == 0
    built = json.loads((cache / "header.json").read_text())
    # kill the rebuild after the old cache was moved aside, before the new one is moved in
    assert_killed(victim(args, "cache-install:1"))
    aside = list(reference.glob("cache.old-*"))
    assert not cache.exists() and len(aside) == 1
    with pytest.raises(DistillError, match=r"cache.old-\w+ beside it is the cache it replaced.*rename it"):
        TeacherCache(cache)
    assert main(args) == 0  # building again works and removes the old cache set aside
    assert json.loads((cache / "header.json").read_text()) == built
    assert not list(reference.glob("cache.old-*"))
    TeacherCache(cache, verify=True)


def test_resume_with_accumulation_windows_that_straddle_epochs(tmp_path):
    """6 steps per epoch in windows of 4: the epoch's last window is short and still updates, so
    no gradient is carried past the checkpoint and a resumed run matches an uninterrupted one."""
    from torch import nn

    from distill import Distiller, Term, TrainConfig, Trainer

    class Stop(Exception):
        pass

    class Loader:
        batch_size, epoch, x = 16, 0, torch.randn(96, 4, generator=torch.Generator().manual_seed(0))

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 6

        def __iter__(self):
            perm = torch.randperm(96, generator=torch.Generator().manual_seed(self.epoch))
            for k in range(6):
                idx = perm[k * 16:(k + 1) * 16]
                yield {"input": self.x[idx], "target": (self.x[idx, 0] > 0).long(), "index": idx}

    class Failing(Loader):
        def __iter__(self):
            if self.epoch == 1:
                raise Stop
            return super().__iter__()

    def distiller():
        torch.manual_seed(0)
        d = Distiller(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), None, [Term("ce", "ce")])
        d.dry_run(next(iter(Loader())))
        return d

    config = TrainConfig(epochs=2, optimizer="sgd", lr=0.1, grad_accum=4, progress=False, tensorboard=False)
    whole = distiller()
    Trainer(whole, Loader(), config, run_dir=tmp_path / "a").fit()
    with pytest.raises(Stop):
        Trainer(distiller(), Failing(), config, run_dir=tmp_path / "b").fit()
    resumed = distiller()
    Trainer(resumed, Loader(), config, run_dir=tmp_path / "b").fit(resume=True)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------------------ corrupt checkpoints
def _state():
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3)}, "epoch": 2, "history": [{"loss": 0.5}]}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(_state(), path)
    return path.read_bytes()


def test_checkpoint_has_a_checksum_header_and_round_trips(tmp_path, checkpoint_bytes):
    head = checkpoint_bytes.split(b"\n", 1)[0].split()
    assert head[0] == b"DISTILL-CHECKPOINT" and head[1] == b"2" and len(head[2]) == 64
    assert int(head[3]) == len(checkpoint_bytes) - len(checkpoint_bytes.split(b"\n", 1)[0]) - 1
    path = tmp_path / "c.pt"
    path.write_bytes(checkpoint_bytes)
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], _state()["model"]["w"]) and state["epoch"] == 2


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[: len(b) // 2], r"is truncated \(\d+ of \d+ bytes\)"),
        (lambda b: b[:-1], "is truncated"),
        (lambda b: b + b"x", "has bytes appended"),
        (lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:], r"is corrupt \(its SHA-256 differs"),
        (lambda b: b[:20], "damaged header"),
        (lambda b: b.replace(b"DISTILL-CHECKPOINT 2", b"DISTILL-CHECKPOINT 9", 1), "format version 9"),
        (lambda b: b"", "is empty"),
    ],
)
def test_damaged_checkpoints_are_refused_with_the_fix(tmp_path, checkpoint_bytes, damage, message):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(damage(checkpoint_bytes))
    with pytest.raises(DistillError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_without_checksum_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_state(), path)  # as distill wrote them before checksums
    assert load_checkpoint(path)["epoch"] == 2


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_or_byte_flip_is_refused(tmp_path, checkpoint_bytes, data):
    if data.draw(st.booleans(), label="truncate"):
        damaged = checkpoint_bytes[: data.draw(st.integers(0, len(checkpoint_bytes) - 1), label="keep")]
    else:
        at = data.draw(st.integers(0, len(checkpoint_bytes) - 1), label="at")
        bit = data.draw(st.integers(0, 7), label="bit")
        damaged = checkpoint_bytes[:at] + bytes([checkpoint_bytes[at] ^ (1 << bit)]) + checkpoint_bytes[at + 1:]
    path = tmp_path / "flipped.pt"
    path.write_bytes(damaged)
    with pytest.raises(DistillError, match="checkpoint"):
        load_checkpoint(path)


def test_resume_from_a_corrupt_checkpoint_is_one_clear_line(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference / "whole", out)
    checkpoint = out / "stages" / "student-seed0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    (out / "stages" / "student-seed0" / "result.json").unlink()
    code = main(["run", str(reference / "recipe.yaml"), "--out", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint ") and "truncated" in err
    assert "delete it to start this stage afresh" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ corrupt caches and logs
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h: h.update(version=7), "has format version 7, this distill reads version 1"),
        (lambda h: h.pop("num_samples"), "lacks num_samples"),
        (lambda h: h["arrays"].pop("logits"), "lists no array logits"),
        (lambda h: h["arrays"]["logits"].update(shape=[5, 1, 10]), r"holds float32 \[\d+, 1, 10\], but header.json says"),
        (lambda h: h["arrays"]["logits"].update(sha256="0" * 64), "logits.npy is corrupt or truncated"),
        (lambda h: h.update(format="something-else"), "is of another format"),
    ],
)
def test_a_cache_with_a_damaged_header_is_refused(reference, tmp_path, edit, message):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(reference / "whole" / "teacher-cache", cache)
    header = json.loads((cache / "header.json").read_text())
    edit(header)
    (cache / "header.json").write_text(json.dumps(header))
    with pytest.raises(DistillError, match=message) as info:
        TeacherCache(cache)
    assert "\n" not in str(info.value)


def test_report_on_corrupt_metrics_is_one_clear_line(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference / "whole", out)
    metrics_csv = out / "stages" / "baseline-seed0" / "metrics.csv"
    metrics_csv.write_text(metrics_csv.read_text() + "3,0.01,\x00garbage\n")
    code = main(["report", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: metrics file {metrics_csv} is corrupt: line 4, column 'train_ce' holds")


# ------------------------------------------------------------------------------ the fault points
def _reset_faults(monkeypatch):
    """Forget what this process read of DISTILL_FAULT (restored after the test)."""
    monkeypatch.setattr(checkpoints, "_fault_read", False)
    monkeypatch.setattr(checkpoints, "_fault", None)
    monkeypatch.setattr(checkpoints, "_fault_counts", {})


def test_fault_points_are_inert_unless_named(monkeypatch):
    _reset_faults(monkeypatch)
    monkeypatch.setenv("DISTILL_FAULT", "epoch-step:teacher:9:9")
    assert checkpoints.fault_armed("epoch-step") and not checkpoints.fault_armed("checkpoint-write")
    fault_point("checkpoint-write")  # not named: returns
    fault_point("epoch-step", "student", 9, 9)  # another trainer: returns
    fault_point("epoch-step", "teacher", 9, 8)
    monkeypatch.delenv("DISTILL_FAULT")
    assert checkpoints.fault_armed("epoch-step")  # read once per process


@pytest.mark.parametrize("value", ["checkpoint-write", "checkpoint-write:x", "epoch-step:3", "crash:1",
                                   "cache-write:1:2"])
def test_a_misspelled_fault_is_an_error(monkeypatch, value):
    _reset_faults(monkeypatch)
    monkeypatch.setenv("DISTILL_FAULT", value)
    with pytest.raises(DistillError, match="is not a fault point; use one of checkpoint-write:N"):
        checkpoints.fault_armed("checkpoint-write")
