"""``distill sweep``: search a recipe's hyperparameters with Optuna, on the validation split.

    result = run_sweep(load_recipe("my.yaml"), trials=40, workers=2, out="sweeps/my")
    result.best_recipe, result.trials, result.comparison

What is searched (the *space*): override paths of the recipe, as for ``--set``, each with a
distribution, given as a mapping (a YAML file for ``--space``, or ``--param PATH=SPEC``)::

    distill.terms.1.params.temperature: {low: 1, high: 8, log: true}
    train.lr: {low: 0.0002, high: 0.01, log: true}
    student.kwargs.width: {low: 4, high: 16, step: 4}     # int: the recipe's value is an int
    distill.terms.1.loss: [kd, dkd]                       # choices (also {choices: [...]})

``type: int|float`` is inferred from the recipe's current value (or the model's or loss's default)
unless given. Without a space, :func:`default_space` searches the temperature of every term that
has one, the weights of the teacher terms (relative to the first label term, which stays fixed),
the learning rate of the distilled student, and the student's ``width``/``depth`` (``width_mult``)
when its model takes them.

How a trial runs: the distilled student of the trial's recipe is trained on the training split
(first seed) and scored by its task's primary metric (accuracy for classification) on the
validation split (``data.val_fraction``; the sweep sets 0.1 when the recipe has none). Each epoch's
validation score is reported to Optuna, and a trial below the median of earlier trials at the same
epoch is stopped early (``MedianPruner``). The
teacher is trained once (or loaded from ``teacher.weights``) and cached once; every trial reads that
cache. The test split is not used to select anything: only after the search are the default recipe
and the best trial's recipe run by :func:`distill.run_recipe` (every seed) and evaluated on it.

Trials run in ``workers`` processes that share one Optuna study in a journal file in the output
folder, each process with ``threads // workers`` torch threads.

The package, one module per job; each imports only modules above it in this list (no circle)::

    space   the searched space: Dimension, parsing --space/--param, default_space, apply_params
    trial   one trial: train_trial, EpochReporter, the Optuna objective, the per-process _CONTEXT
    study   the Optuna study: journal storage, the pruner, one worker's share of the trials
    report  trials table and CSV, importances, plots, the final comparison, the files written
    run     run_sweep (and SweepResult): the whole sweep, from the space to the comparison

so ``space <- trial <- study <- run`` and ``space, trial <- report <- run``; this ``__init__``
re-exports their public names (and ``_CONTEXT``, the same dict), so ``from distill.sweep import X``
works as when the sweep was one module.
"""

from distill.sweep.report import (
    atomic_text,
    comparison_params,
    param_importances,
    pareto_front,
    plot_importance,
    plot_pareto,
    short_names,
    trial_rows,
    write_csv,
)
from distill.sweep.run import SweepResult, run_sweep
from distill.sweep.space import (
    SEARCHABLE,
    SPEC_KEYS,
    Dimension,
    apply_params,
    current_value,
    default_space,
    parse_dimension,
    parse_space,
    read_space,
    set_value,
)
from distill.sweep.study import default_pruner
from distill.sweep.trial import (  # noqa: F401 (_CONTEXT: the per-process cache, the same dict)
    _CONTEXT,
    EpochReporter,
    TrialOutcome,
    check_searchable,
    require_optuna,
    train_trial,
)


__all__ = [
    "SEARCHABLE",
    "SPEC_KEYS",
    "Dimension",
    "EpochReporter",
    "SweepResult",
    "TrialOutcome",
    "apply_params",
    "atomic_text",
    "check_searchable",
    "comparison_params",
    "current_value",
    "default_pruner",
    "default_space",
    "param_importances",
    "pareto_front",
    "parse_dimension",
    "parse_space",
    "plot_importance",
    "plot_pareto",
    "read_space",
    "require_optuna",
    "run_sweep",
    "set_value",
    "short_names",
    "train_trial",
    "trial_rows",
    "write_csv",
]
