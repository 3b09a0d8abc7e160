"""What a run ends with, typed: :class:`RunResult` (written as ``results.json``) and its roles.

The pipeline builds it; the report, the command line, the sweep, the ladder and the plots read it
through these fields, so they cannot disagree about a key::

    result = RunResult.load("runs/demo")
    result.student.metric(result.primary_metric), result.student.std("accuracy"), result.verdict

A role (``teacher``, ``baseline``, ``student``) carries its model, size and cost as fields and the
task's metrics (``accuracy``, ``perplexity``, ``ndcg10``, ``agreement``, ``kl_to_teacher``...) and
their spread over seeds (``<metric>_std``) as extra fields, since each task has its own.

Code written against the dict that runs returned before keeps working: ``result["student"]``,
``result.get("pilot")`` and ``"baseline" in result`` read the JSON form (see :meth:`RunResult.__getitem__`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.checkpoints import atomic_write
from distill.errors import DistillError

#: the roles of a run, in table order, with the label the report gives them
ROLES = (("teacher", "teacher"), ("baseline", "baseline (no teacher)"), ("student", "distilled"))


class RoleResult(BaseModel):
    """One role's test metrics (the mean over seeds), their spread, its size and cost."""

    model_config = ConfigDict(extra="allow")  # the task's metrics and their "<metric>_std"

    model: str = ""
    params: int | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    #: the primary metric of every seed (``None`` for the teacher, trained once)
    per_seed: dict[str, list[float]] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The task's metrics and their spreads (every extra field)."""
        return dict(self.model_extra or {})

    def metric(self, key: str) -> float | None:
        """The mean of metric ``key`` over seeds, or ``None`` when this role has none."""
        value = (self.model_extra or {}).get(key)
        return None if value is None else float(value)

    def std(self, key: str) -> float:
        """The standard deviation of metric ``key`` over seeds (0 with one seed or none recorded)."""
        return float((self.model_extra or {}).get(f"{key}_std") or 0.0)

    def has(self, key: str) -> bool:
        return key in (self.model_extra or {}) or (key in type(self).model_fields and getattr(self, key) is not None)


class RunResult(BaseModel):
    """A finished run: where it came from, each role's results, and the verdict."""

    model_config = ConfigDict(extra="allow")  # keys written by other versions are kept, not refused

    recipe: str | None = None
    task: str = "classification"
    primary_metric: str = "accuracy"
    data: str | None = None
    seeds: list[int] = []
    threads: int | None = None
    training_samples: int | None = None
    #: samples with a label when the data has an unlabelled transfer set (``data.labelled``)
    labelled_samples: int | None = None
    teacher: RoleResult | None = None
    baseline: RoleResult | None = None
    student: RoleResult | None = None
    #: metrics besides the primary one that the report shows as columns (e.g. perplexity)
    report_metrics: list[str] = []
    verdict: str = ""
    teacher_gate: dict[str, Any] | None = None
    #: the schedule fields in which the distilled stage differs from the student alone
    schedule_difference: str | None = None
    advice: dict[str, Any] | None = None
    pilot: dict[str, Any] | None = None
    assistants: list[dict[str, Any]] | None = None
    #: born-again generations: the primary metric of each generation, the last the distilled student
    generations: list[float] | None = None

    def roles(self) -> Iterator[tuple[str, RoleResult]]:
        """``(name, role)`` for each role the run trained, in table order."""
        for name, _ in ROLES:
            role = getattr(self, name)
            if role is not None:
                yield name, role

    @property
    def compared(self) -> bool:
        """Whether both the student alone and the distilled student were trained."""
        return self.baseline is not None and self.student is not None

    # -- files ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=2)
        atomic_write(path, lambda f: f.write(text.encode()))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResult:
        """The ``results.json`` of a finished run directory (or the file itself)."""
        path = Path(run_dir)
        if path.is_dir() or path.name != "results.json":
            path = path / "results.json"
        if not path.is_file():
            raise DistillError(f"{path.parent} has no results.json: is it a finished run directory?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, where: str = "results") -> RunResult:
        """A result from its JSON form, or a :class:`DistillError` naming the first wrong field."""
        if isinstance(data, RunResult):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise DistillError(f"{where} is not a run's results: {field}: {first['msg']}") from None

    # -- the dict runs returned before (a migration aid: new code reads the fields) --------------
    def __getitem__(self, key: str) -> Any:
        data = self.to_json()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def keys(self):
        return self.to_json().keys()
