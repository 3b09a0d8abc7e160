"""Profiling: MACs counted by hand, peak activation memory of known layers, bytes on disk, latency
percentiles, the teacher-vs-student table and its JSON, and the CLI on models and on a run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from torch import nn

from distill.cli import main
from distill.errors import DistillError
from distill.models import create_model, save_weights
from distill.profile import (compare_profiles, count_macs, peak_memory, percentile, profile_model,
                             serialized_size)

torch.set_num_threads(1)

try:
    import onnxruntime  # noqa: F401
    HAVE_ONNX = True
except ImportError:  # pragma: no cover
    HAVE_ONNX = False


def test_macs_of_a_linear_layer_at_batch_1():
    assert count_macs(nn.Linear(10, 20), torch.randn(1, 10)) == 200
    assert count_macs(nn.Linear(10, 20), torch.randn(4, 10)) == 800


def test_macs_of_a_convolution():
    # each of 8 x 4 x 4 outputs sums 3 x 3 x 3 products
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 4, 4)) == 8 * 16 * 27
    # depthwise: each output channel sees one input channel
    assert count_macs(nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(1, 8, 4, 4)) == 8 * 16 * 9


def test_peak_memory_counts_activations_alive_together():
    x = torch.randn(10, 100)  # outputs: 10 x 200 floats = 8000 bytes, 10 x 50 floats = 2000 bytes
    relu = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 50)).eval()
    # the first layer's output and ReLU's (a new tensor) are alive together
    assert peak_memory(relu, x) == 8000 + 8000
    inplace = nn.Sequential(nn.Linear(100, 200), nn.ReLU(inplace=True), nn.Linear(200, 50)).eval()
    assert peak_memory(inplace, x) == 8000 + 2000  # ReLU writes in place; the last output joins
    wide = nn.Sequential(nn.Linear(100, 4000), nn.Linear(4000, 1)).eval()  # big weights are not counted
    assert peak_memory(wide, torch.randn(1, 100)) == 4000 * 4 + 4


def test_serialized_size_is_the_safetensors_file_size(tmp_path):
    model = create_model("resnet8", 10, (3, 16, 16))
    path = save_weights(model, tmp_path / "w.safetensors")
    assert serialized_size(model) == path.stat().st_size


def test_percentile():
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile(list(range(101)), 95) == 95
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_profile_model_measures_both_batches_and_restores_threads():
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    p = profile_model(model, (10,), batch=8, threads=1, repeats=5, warmup=1)
    assert p.params == 10 * 20 + 20 + 20 * 3 + 3 and p.macs == 260
    assert set(p.peak_memory_bytes) == {1, 8} and p.peak_memory_bytes[8] > p.peak_memory_bytes[1] > 0
    assert set(p.latency["eager"]) == {1, 8}
    for lat in p.latency["eager"].values():
        assert 0 < lat.p50_ms <= lat.p95_ms and lat.repeats == 5
    assert ("onnxruntime" in p.latency) == HAVE_ONNX
    assert p.threads == 1 and torch.get_num_threads() == 1
    data = json.loads(json.dumps(p.to_dict()))
    assert data["latency"]["eager"]["8"]["p50_ms"] == p.latency["eager"][8].p50_ms


def test_compare_profiles_gives_speedups_against_the_first():
    big = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    small = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    profiles = [profile_model(m, (64,), name=n, batch=4, repeats=5, warmup=1, onnx=False)
                for n, m in (("big", big), ("small", small))]
    ratios = compare_profiles(profiles)["small"]
    assert ratios["macs"] == pytest.approx(profiles[0].macs / profiles[1].macs)
    assert ratios["params"] > 20 and ratios["eager_b1"] > 0 and "eager_b4" in ratios


def test_onnx_requested_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DistillError, match=r"pip install distill\[onnx\]"):
        profile_model(nn.Linear(3, 2), (3,), repeats=1, onnx=True)
    p = profile_model(nn.Linear(3, 2), (3,), repeats=1)  # auto: skipped, and said so
    assert "onnxruntime" not in p.latency and "pip install distill[onnx]" in p.notes[0]


# ------------------------------------------------------------------------------ the command
def test_profile_command_on_two_zoo_models(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = main(["profile", "resnet20", "resnet8", "--input-shape", "3,16,16", "--classes", "10",
                 "--batch", "4", "--repeats", "3", "--threads", "1", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "resnet20 / resnet8" in stdout and "eager p50 ms, batch 4" in stdout and "1 thread(s)" in stdout
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["batch"] == 4 and [m["name"] for m in data["models"]] == ["resnet20", "resnet8"]
    teacher, student = data["models"]
    # ResNet-20 has 3 residual blocks per stage, ResNet-8 one: about 3x the MACs
    assert 2.5 < teacher["macs"] / student["macs"] < 3.5
    assert data["speedup_vs_first"]["resnet8"]["macs"] == pytest.approx(teacher["macs"] / student["macs"])


@pytest.mark.parametrize("args,message", [
    (["profile", "resnet9000"], "neither a run directory nor a model name; nearest models:"),
    (["profile", "resnet8"], "needs --input-shape"),
    (["profile", "resnet8", "--input-shape", "3,x"], "--input-shape expects positive integers"),
])
def test_profile_command_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


RECIPE = {
    "name": "prof",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [256, 256]}, "train": {"epochs": 1, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
    "train": {"epochs": 1, "lr": 0.01, "batch_size": 64},
    "baseline": {"enabled": False},
    "distill": {"terms": [{"loss": "kd"}]},
    "evaluate": {"latency": False},
}


def test_profile_command_on_a_run_compares_teacher_and_student(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.json"
    assert main(["profile", str(run), "--batch", "16", "--repeats", "5", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "teacher (mlp)" in stdout and "student (mlp)" in stdout
    data = json.loads(out.read_text())
    teacher, student = data["models"]
    assert data["input_shape"] == [1, 8, 8]
    assert teacher["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert student["macs"] == 64 * 16 + 16 * 10
    ratios = data["speedup_vs_first"][student["name"]]
    assert ratios["params"] > 50 and set(ratios) >= {"eager_b1", "eager_b16", "macs", "size_bytes"}
