import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared/data beside the repository (present on developer machines and in CI)."""
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"test data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture
def recorded_stages(monkeypatch) -> dict[str, dict]:
    """Every stage assembled from now on (by ``distill.stage.assemble_stage``), by name: its terms,
    transforms, teacher signal and monitor (the stage object itself under ``"NAME:stage"``). The
    one-stage tests compare what check, run and a sweep trial built."""
    import distill.stage as stage_module

    seen: dict[str, dict] = {}
    original = stage_module.assemble_stage

    def spy(name, student, teacher, terms, **kwargs):
        built = original(name, student, teacher, terms, **kwargs)
        seen[name] = {
            "terms": [(t.name, t.loss, t.weight, t.params) for t in terms],
            "transforms": [t.__qualname__ if type(t).__name__ == "function" else type(t).__name__
                           for t in built.transforms],
            "signal": type(teacher).__name__,
            "monitor": built.config.monitor,
        }
        seen[f"{name}:stage"] = built
        return built

    monkeypatch.setattr(stage_module, "assemble_stage", spy)
    return seen
