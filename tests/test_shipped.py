"""The teachers that come with distill (``teacher.weights: shipped:NAME``): each file matches its
manifest's SHA-256, is fp16, loads into the model its manifest names, and a damaged or unknown one
is refused with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import distill.models.weights as weights_module
from distill import DistillError
from distill.models import create_model, load_weights
from distill.models.weights import read_state_dict, resolve_weights, shipped_teachers

pytestmark = pytest.mark.fast

INPUTS = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "mnist1d": (40,), "cifar10": (3, 32, 32)}


def test_every_shipped_teacher_has_its_file_checksum_command_log_and_accuracy():
    found = shipped_teachers()
    assert {"mnist-hinton1200", "mnist1d-cnn64", "fashion-cnn16"} <= set(found)
    folder = Path(weights_module.__file__).parent.parent / "teachers"
    for name, manifest in found.items():
        file = folder / manifest["file"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == manifest["sha256"], name
        assert manifest["dtype"] == "fp16" and all(v.dtype in (torch.float16, torch.int64)
                                                   for v in read_state_dict(f"shipped:{name}").values())
        assert manifest["command"].startswith("python benchmarks/teachers.py ") and (folder / manifest["log"]).is_file()
        assert 0.5 < manifest["test_accuracy_fp16"] <= 1 and abs(manifest["test_accuracy_fp16"] - manifest["test_accuracy"]) < 0.002
        model = create_model(manifest["model"], 10, INPUTS[manifest["data"]["name"]], **manifest["kwargs"])
        load_weights(model, f"shipped:{name}")  # every tensor fits the model the manifest names


def test_a_damaged_or_unknown_shipped_teacher_is_refused(tmp_path, monkeypatch):
    with pytest.raises(DistillError, match="no shipped teacher 'mnist-hinton'; shipped: mnist-hinton1200"):
        resolve_weights("shipped:mnist-hinton")
    folder = tmp_path / "distill"
    shutil.copytree(Path(weights_module.__file__).parent.parent / "teachers", folder / "teachers")
    manifest = json.loads((folder / "teachers" / "mnist1d-cnn64.json").read_text())
    data = bytearray((folder / "teachers" / manifest["file"]).read_bytes())
    data[-1] ^= 1
    (folder / "teachers" / manifest["file"]).write_bytes(bytes(data))
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: folder)
    with pytest.raises(DistillError, match="damaged .* reinstall distill"):
        resolve_weights("shipped:mnist1d-cnn64")
