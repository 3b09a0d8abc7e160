"""The Optuna study of ``distill sweep``: its journal storage (one file that worker processes
share), the pruner, and ``_search``, one worker running its share of the trials (in the calling
process or a spawned one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError
from distill.sweep.space import Dimension
from distill.sweep.trial import _objective, require_optuna


def _storage(path: Path):
    optuna = require_optuna()
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        return optuna.storages.JournalStorage(optuna.storages.JournalFileStorage(str(path)))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def default_pruner(trials: int):
    """Optuna's median pruner: stop a trial whose validation score at an epoch (from the second
    on) is below the median of earlier trials at that epoch, once a few trials have finished."""
    optuna = require_optuna()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, trials // 4)), n_warmup_steps=2)


def _announce(study, trial) -> None:
    attrs = trial.user_attrs
    if trial.state.name == "COMPLETE":
        what = f"validation score {trial.value:.4f}, {attrs.get('latency_ms', float('nan')):.3f} ms"
    elif trial.state.name == "PRUNED":
        what = f"pruned after epoch {attrs.get('epochs')} (validation score {attrs.get('val_score') or 0:.4f})"
    else:
        what = f"failed: {attrs.get('error', 'see the log')}"
    print(f"trial {trial.number}: {what}", flush=True)


def _search(journal: str, study_name: str, n_trials: int, base: dict[str, Any], dims: list[Dimension],
            data_dir, threads: int, sampler_seed: int, pruner, repeats: int, verbose: bool) -> None:
    """One worker: ``n_trials`` trials of the shared study (in this process or a spawned one)."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
        study = optuna.load_study(study_name=study_name, storage=_storage(Path(journal)), sampler=sampler,
                                  pruner=pruner)
        study.optimize(lambda trial: _objective(trial, base, dims, data_dir, repeats), n_trials=n_trials,
                       catch=(DistillError,), callbacks=[_announce] if verbose else None)
    finally:
        torch.set_num_threads(previous)
