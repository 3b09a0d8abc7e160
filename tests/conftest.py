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
