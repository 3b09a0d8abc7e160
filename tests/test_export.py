"""Export: every zoo model round-trips through every format, the exported file loads back and
computes the same logits, a wrong file fails the parity check and is not written, and int8
quantisation reports its accuracy next to fp32."""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill import export
from distill.cli import main
from distill.errors import DistillError
from distill.export import export_model, parity_inputs, random_inputs
from distill.models import create_model, load_weights, model_names

torch.set_num_threads(1)

try:
    import onnx  # noqa: F401
    import onnxruntime as ort
except ImportError:  # pragma: no cover - the onnx extra is part of [test]
    ort = None

needs_onnx = pytest.mark.skipif(ort is None, reason="needs the onnx extra")
FORMATS = ["torchscript", "safetensors", pytest.param("onnx", marks=needs_onnx)]
SEQUENCE_MODELS = {"cnn1d"}
FLAT_MODELS = {"mlp", "hinton-teacher", "hinton-student", "hinton-tiny"}
LANGUAGE_MODELS = {"gpt"}  # token ids [B, T] (random_inputs draws them) -> logits [B, T, V]


def small_shape(name: str) -> tuple[int, ...]:
    if name in SEQUENCE_MODELS:
        return (40,)
    if name in LANGUAGE_MODELS:
        return (8,)
    if name in FLAT_MODELS:
        return (12,)
    return (3, 16, 16)


def load_file(fmt: str, path: Path, fresh: nn.Module):
    """The exported file loaded the way a deployment would, as ``inputs -> logits``."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path))
    else:
        module = load_weights(fresh, path)
    module.eval()
    return lambda x: module(x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_exports_and_loads_back_with_the_same_logits(name, fmt, tmp_path):
    shape = small_shape(name)
    torch.manual_seed(0)
    model = create_model(name, 7, shape).eval()
    x = random_inputs(model, shape, 5, seed=1)
    path = tmp_path / f"model{export.FORMATS[fmt]}"
    result = export_model(model, path, fmt, parity_inputs(x, 2))
    assert result.parity.passed and result.parity.samples == 5 and result.parity.agreement == 1.0
    assert path.stat().st_size == result.size_bytes
    run = load_file(fmt, path, create_model(name, 7, shape))
    with torch.no_grad():
        for batch in (x[:1], x):  # the batch axis is not baked in
            expected, got = model(batch), run(batch)
            assert got.shape == expected.shape
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)
            if fmt != "onnx":
                assert torch.equal(got, expected)


def tiny_mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 5)).eval()


def shifted_classifier(delta: float):
    """``_serialise`` that writes a model whose class-0 logit is ``delta`` higher: a file that
    does not compute what the model does (the first class's bias changed)."""
    original = export._serialise

    def serialise(model, fmt, example):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            [m for m in bad.modules() if isinstance(m, nn.Linear)][-1].bias[0] += delta
        return original(bad, fmt, example)

    return serialise


@pytest.mark.parametrize("fmt", FORMATS)
def test_parity_check_fails_on_a_file_that_differs_and_writes_nothing(fmt, tmp_path, monkeypatch):
    model = tiny_mlp()
    x = torch.randn(20, 12)
    path = tmp_path / "student.bin"
    path.write_bytes(b"previous export")
    monkeypatch.setattr(export, "_serialise", shifted_classifier(0.5))
    with pytest.raises(DistillError, match=r"parity check failed: .* by up to 0\.5 > 0\.0001"):
        export_model(model, path, fmt, parity_inputs(x))
    assert path.read_bytes() == b"previous export"  # the old file is untouched, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.bin"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_tolerance_decides(fmt, tmp_path, monkeypatch):
    model = tiny_mlp()
    with torch.no_grad():
        assert float(model(torch.randn(20, 12)).abs().max()) < 1  # so the allowed difference is the tolerance
    monkeypatch.setattr(export, "_serialise", shifted_classifier(0.01))
    x = torch.randn(20, 12)
    result = export_model(model, tmp_path / "ok", fmt, parity_inputs(x), tolerance=0.02)
    assert result.parity.max_abs_diff == pytest.approx(0.01, abs=1e-5)
    with pytest.raises(DistillError, match="parity check failed"):
        export_model(model, tmp_path / "bad", fmt, parity_inputs(x), tolerance=0.005)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_int8_export_reports_accuracy_next_to_fp32(fmt, tmp_path):
    model = tiny_mlp(hidden=1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    with torch.no_grad():
        labels = model(x).argmax(-1)  # labels the fp32 model gets all right
    batches = [{"input": x[i:i + 100], "target": labels[i:i + 100]} for i in range(0, 300, 100)]
    fp32 = export_model(model, tmp_path / "fp32", fmt, parity_inputs(x[:64]))
    result = export_model(model, tmp_path / "int8", fmt, parity_inputs(x[:64]), quantize="int8", test_batches=batches)
    q = result.quantization
    assert q.accuracy_fp32 == 1.0 and q.test_samples == 300
    assert 0.9 <= q.accuracy_int8 <= 1.0 and q.accuracy_drop == pytest.approx(1.0 - q.accuracy_int8)
    assert 0 < q.max_abs_diff < 0.5 and q.agreement >= 0.9  # int8 changes the logits, a little
    assert result.size_bytes < 0.6 * fp32.size_bytes  # the 12x1024 and 1024x5 weights stored in int8
    # the written int8 file loads back and gives what the export measured
    run = load_file(fmt, tmp_path / "int8", None)
    with torch.no_grad():  # batch by batch: dynamic int8 scales activations by each batch's range
        correct = sum(int((run(b["input"]).argmax(-1) == b["target"]).sum()) for b in batches)
    assert correct / 300 == pytest.approx(q.accuracy_int8)
    with pytest.raises(DistillError, match="more than --max-accuracy-drop"):
        export_model(model, tmp_path / "strict", fmt, parity_inputs(x[:64]), quantize="int8",
                     test_batches=batches, max_accuracy_drop=-0.01)
    assert not (tmp_path / "strict").exists()


def test_safetensors_int8_and_unknown_formats_are_refused(tmp_path):
    x = [torch.randn(2, 12)]
    with pytest.raises(DistillError, match="int8 export needs --format torchscript or onnx"):
        export_model(tiny_mlp(), tmp_path / "a", "safetensors", x, quantize="int8")
    with pytest.raises(DistillError, match="unknown export format 'tflite'"):
        export_model(tiny_mlp(), tmp_path / "a", "tflite", x)


def test_onnx_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(DistillError, match=r"pip install distill\[onnx\]"):
        export_model(tiny_mlp(), tmp_path / "a.onnx", "onnx", [torch.randn(2, 12)])


# ------------------------------------------------------------------------------ the command
RECIPE = {
    "name": "exp",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}, "train": {"epochs": 2, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [32]}},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64},
    "baseline": {"enabled": False},
    "distill": {"terms": [{"name": "soft", "loss": "kd", "params": {"temperature": 2.0}},
                          {"name": "hint", "loss": "hint", "student": "act1", "teacher": "act1"}]},
    "evaluate": {"latency": False},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-run")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(tmp / "recipe.yaml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_command_writes_the_student_alone(run_dir, fmt, tmp_path, capsys):
    out = tmp_path / f"student{export.FORMATS[fmt]}"
    report = tmp_path / "export.json"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out), "--json", str(report)]) == 0
    stdout = capsys.readouterr().out
    assert "parity against the fp32 eager model" in stdout and "top-1 agreement 100.00% on 256 samples" in stdout
    data = json.loads(report.read_text())
    assert data["parity"]["passed"] and data["parity"]["samples"] == 256
    student = create_model("mlp", 10, (1, 8, 8), hidden=[32])
    load_weights(student, run_dir / "student.safetensors")
    run = load_file(fmt, out, create_model("mlp", 10, (1, 8, 8), hidden=[32]))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(run(x), student(x), rtol=0, atol=1e-5)
    if fmt == "safetensors":  # no adapter (the hint term had one) and no teacher in the file
        from safetensors.torch import load_file as read

        assert set(read(out)) == set(student.state_dict())


def test_export_command_int8_reports_test_accuracy(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "torchscript", "--quantize", "int8"]) == 0
    stdout = capsys.readouterr().out
    assert (run_dir / "export" / "student-int8.pt").is_file()
    assert "int8 vs fp32" in stdout and "test accuracy (360 samples): fp32" in stdout and "int8" in stdout


def test_export_command_fails_with_exit_2_when_parity_fails(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "_serialise", shifted_classifier(1.0))
    out = tmp_path / "student.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parity check failed") and "nothing was written" in err
    assert not out.exists()


def test_export_command_on_a_model_name_uses_random_inputs(tmp_path, capsys):
    out = tmp_path / "r.pt"
    code = main(["export", "resnet8", "--input-shape", "3,16,16", "--classes", "4", "--format", "torchscript",
                 "--out", str(out), "--samples", "8"])
    assert code == 0 and out.is_file() and "on 8 samples" in capsys.readouterr().out
    assert main(["export", "resnet8", "--format", "onnx"]) == 2
    assert "needs --input-shape" in capsys.readouterr().err


# ------------------------------------------------------------------------------ what the file records
def native_metadata(fmt: str, path: Path) -> dict:
    """The ``distill`` metadata read with the format's own library, as a deployer would."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return json.loads(session.get_modelmeta().custom_metadata_map["distill"])
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["distill"])
    extra = {"distill.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["distill.json"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_file_records_what_a_deployer_needs(run_dir, fmt, tmp_path):
    import hashlib

    import distill
    from distill.finished_run import FinishedRun

    out = tmp_path / f"student{export.FORMATS[fmt]}"
    result = export.export_source(FinishedRun(run_dir), fmt, out)
    meta = native_metadata(fmt, out)
    assert meta == export.read_metadata(out) == result.metadata
    data = FinishedRun(run_dir).prepared.data  # digits: normalised, with class names
    assert meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert meta["normalization"]["mean"] == pytest.approx(list(data.mean))
    assert meta["normalization"]["std"] == pytest.approx(list(data.std))
    assert meta["class_names"] == list(data.class_names)
    assert meta["seed"] == 0 and meta["student_model"] == "mlp" and meta["student_kwargs"] == {"hidden": [32]}
    assert meta["recipe_sha256"] == hashlib.sha256((run_dir / "recipe.yaml").read_bytes()).hexdigest()
    assert meta["distill_version"] == distill.__version__ and meta["format"] == fmt and meta["quantize"] is None
    run = load_file(fmt, out, create_model("mlp", 10, (1, 8, 8), hidden=[32]))  # still loads as before
    assert run(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_int8_file_keeps_its_metadata_through_quantisation(run_dir, fmt, tmp_path):
    from distill.finished_run import FinishedRun

    out = tmp_path / f"student-int8{export.FORMATS[fmt]}"
    export.export_source(FinishedRun(run_dir), fmt, out, quantize="int8")
    meta = native_metadata(fmt, out)
    assert meta["quantize"] == "int8" and meta["seed"] == 0


def test_metadata_leaves_out_what_the_data_lacks(tmp_path):
    """A model without a run: no normalisation, class names, seed or recipe to record."""
    from distill.finished_run import NamedModel

    out = tmp_path / "m.safetensors"
    export.export_source(NamedModel("resnet8", (3, 16, 16), 4), "safetensors", out, samples=4)
    meta = export.read_metadata(out)
    assert meta["input_shape"] == [3, 16, 16] and meta["num_classes"] == 4 and meta["model"] == "resnet8"
    assert not {"normalization", "class_names", "seed", "recipe_sha256"} & set(meta)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_int8_on_a_cnn_says_the_conv_layers_stay_fp32(fmt, tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", 4, (3, 16, 16)).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    share = 100 * sum(p.numel() for m in convs for p in m.parameters()) / sum(p.numel() for p in model.parameters())
    x = torch.randn(6, 3, 16, 16)
    result = export_model(model, tmp_path / "r", fmt, parity_inputs(x, 3), quantize="int8")
    assert (f"int8 dynamic quantisation covers nn.Linear only: {len(convs)} of {len(convs)} conv layers stay "
            f"fp32 ({share:.0f}% of parameters)") in result.notes
    assert any(n.startswith("quantised to int8: 1 nn.Linear layer") for n in result.notes)
    assert result.to_dict()["notes"] == result.notes
    mlp = export_model(tiny_mlp(), tmp_path / "m", fmt, [torch.randn(4, 12)], quantize="int8")
    assert mlp.notes == [f"quantised to int8: 2 nn.Linear layers{' (ONNX: MatMul/Gemm)' if fmt == 'onnx' else ''} "
                         "(100% of parameters)"]
    assert export_model(tiny_mlp(), tmp_path / "f", fmt, [torch.randn(4, 12)]).notes == []  # fp32: nothing to say


# ------------------------------------------------------------------------------ models from the working directory
USER_MODEL = '''
from torch import nn


def Tiny(num_classes, input_shape, hidden=6):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''


def test_a_model_file_in_the_working_directory_imports_without_pythonpath(tmp_path, monkeypatch, capsys):
    """The console script does not put the working directory on sys.path; the import tries it."""
    name = "distill_test_cwd_nets"
    (tmp_path / f"{name}.py").write_text(USER_MODEL)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # as the console script has it
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        model = create_model(f"{name}:Tiny", 3, (5,))
        assert model(torch.randn(2, 5)).shape == (2, 3)
        assert main(["export", f"{name}:Tiny", "--input-shape", "5", "--classes", "3", "--format", "torchscript",
                     "--samples", "4"]) == 0
        assert (tmp_path / f"{name}_Tiny.pt").is_file()
    finally:
        sys.modules.pop(name, None)
    capsys.readouterr()


def test_a_missing_user_model_says_how_it_is_called(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError) as info:
        create_model("distill_no_such_nets_xyz:Tiny", 3, (5,))
    message = str(info.value)
    assert "cannot import module 'distill_no_such_nets_xyz'" in message and str(tmp_path) in message
    assert "keyword arguments num_classes and input_shape" in message
    assert str(tmp_path) not in sys.path  # a failed try leaves sys.path as it was
