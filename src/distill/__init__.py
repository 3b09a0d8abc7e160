"""distill: knowledge distillation for PyTorch.

    from distill import Distiller, Term, Trainer, TrainConfig
"""

from distill.ensemble import TeacherEnsemble
from distill.errors import DistillError
from distill.mutual import MutualLearner
from distill.objective import Distiller, DistillOutput, Term
from distill.signals import LiveTeacher, TeacherSignal
from distill.taps import Taps
from distill.trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "Distiller", "DistillOutput", "Term", "Taps", "LiveTeacher", "TeacherSignal", "Trainer",
    "TrainConfig", "TeacherEnsemble", "MutualLearner", "DistillError", "load_recipe", "run_recipe", "__version__",
]


def load_recipe(source, overrides=()):
    """Load and validate a recipe (path, preset name or mapping); see :mod:`distill.recipes`."""
    from distill.recipes import load_recipe as _load

    return _load(source, overrides)


def run_recipe(recipe, run_dir, **kwargs):
    """Run a recipe end to end in ``run_dir``; see :mod:`distill.pipeline`."""
    from distill.pipeline import run_recipe as _run

    return _run(recipe, run_dir, **kwargs)
