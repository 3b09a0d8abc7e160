"""distill: knowledge distillation for PyTorch.

    from distill import Distiller, Term, Trainer, TrainConfig

Names are imported on first use (PEP 562), so ``import distill`` and ``distill --help`` do not load
torch and accelerate until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from distill.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Distiller": "distill.objective", "DistillOutput": "distill.objective", "Term": "distill.objective",
    "Taps": "distill.taps", "LiveTeacher": "distill.signals", "TeacherSignal": "distill.signals",
    "Trainer": "distill.trainer", "TrainConfig": "distill.train_config", "TeacherEnsemble": "distill.ensemble",
    "MutualLearner": "distill.mutual", "DistillError": "distill.errors",
    "load_recipe": "distill.recipes", "run_recipe": "distill.pipeline", "RunResult": "distill.run_result",
    "TokenCache": "distill.token_cache",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
