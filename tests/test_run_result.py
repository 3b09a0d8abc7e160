"""The typed run result (distill.run_result): what report, CLI, sweep, ladder and plots read."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from distill import DistillError
from distill.recipes import load_recipe
from distill.report import markdown_table
from distill.run_result import RunResult

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "distill"


def tiny_recipe() -> dict:
    fast = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003}
    return {
        "name": "tiny", "seeds": [0, 1], "threads": 1, "data": {"name": "digits"},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [16]}, "train": fast, "gate": {"enabled": False}},
        "student": {"model": "mlp", "kwargs": {"hidden": [4]}}, "train": fast,
        "distill": {"terms": [{"name": "soft", "loss": "kd"}]}, "evaluate": {"latency": False},
    }


def test_a_run_returns_and_writes_a_typed_result(tmp_path):
    from distill.pipeline import run_recipe

    result = run_recipe(load_recipe(tiny_recipe()), tmp_path / "run", progress=False)
    assert isinstance(result, RunResult) and result.compared and result.task == "classification"
    assert result.student.per_seed["accuracy"] and len(result.student.per_seed["accuracy"]) == 2
    assert 0.0 <= result.student.metric("accuracy") <= 1.0 and result.student.std("accuracy") >= 0.0
    assert result.student.params < result.teacher.params
    loaded = RunResult.load(tmp_path / "run")
    assert loaded == result
    # the dict the API returned before still answers, from the same data
    assert result["student"]["accuracy"] == result.student.metric("accuracy")
    assert "baseline" in result and result.get("advice") == (result.advice if result.advice else None)
    assert json.loads((tmp_path / "run/results.json").read_text()) == result.to_json()


def test_results_written_by_earlier_versions_still_load_and_report():
    """Results files kept by the benchmarks (older runs) load as typed results and tabulate."""
    record = json.loads((ROOT / "benchmarks/results/demo.json").read_text())
    result = RunResult.parse(record["results"])
    assert result.compared and result.student.metric(result.primary_metric) is not None
    table = markdown_table(result)
    assert table == markdown_table(record["results"]) and "distilled" in table


def test_a_malformed_results_file_is_refused_naming_the_field(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"task": "classification",
                                                       "student": {"model": "mlp", "params": "many"}}))
    with pytest.raises(DistillError, match=r"results.json is not a run's results: student.params"):
        RunResult.load(tmp_path)
    with pytest.raises(DistillError, match="has no results.json"):
        RunResult.load(tmp_path / "nowhere")


def test_no_module_reads_a_run_result_by_string_keys():
    """Report, CLI, sweep, ladder, plots and the pipeline read the typed fields: a `results[...]`
    subscript or `results.get(...)` in the package is a way back to the untyped dict."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "run_result.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "results":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "results"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders
