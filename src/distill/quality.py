"""Is the teacher worth distilling from? A quality gate, and the temperature that calibrates it.

A student trained on a teacher's soft targets inherits the teacher's mistakes: a teacher below
the accuracy the task needs, or no better than the student trained alone on the labels, can only
pull the student down. :func:`teacher_gate` says pass or fail with the reasons, from the teacher's
test metrics and (when known) the student-alone accuracy.

:func:`fit_temperature` is temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks"): the single ``T > 0`` that minimises the negative log-likelihood of
``softmax(logits / T)`` on held-out data. ``T > 1`` means the teacher is over-confident. It is
reported as the suggested temperature: soft targets at ``T`` are the teacher's calibrated
probabilities (KD usually softens further, T = 2-8; a calibrated T well above 1 says the teacher's
raw probabilities overstate its certainty).

In a run (:func:`assess_teacher`, recipe section ``teacher.gate``), the accuracy threshold is
checked right after the teacher is evaluated, and the baseline comparison right after the first
seed's baseline (the student trained alone) is evaluated, which is before any distilled student
is trained (a run trains, for each seed, the baseline and then the distilled student).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from distill.errors import DistillError

OVERRIDE = "--set teacher.gate.enabled=false"
_GOLDEN = (math.sqrt(5) - 1) / 2


# ------------------------------------------------------------------------------ temperature
def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` [N] under ``softmax(logits / T)`` (logits [N, C])."""
    return float(F.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(
    logits: torch.Tensor, targets: torch.Tensor, low: float = 0.05, high: float = 20.0, tol: float = 1e-5
) -> float:
    """The temperature in ``[low, high]`` minimising :func:`nll` (temperature scaling).

    NLL is convex in ``1 / T`` (a log-sum-exp of a linear function minus a linear one), so a
    log-spaced grid brackets the minimum and a golden-section search on ``1 / T`` refines it.
    """
    if not 0 < low < high:
        raise ValueError("need 0 < low < high")
    logits, targets = logits.detach().double().cpu(), targets.detach().cpu()
    grid = torch.logspace(math.log10(low), math.log10(high), 61, dtype=torch.float64).tolist()
    values = [nll(logits, targets, t) for t in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    # search over a = 1/T between the grid neighbours of the best point
    a_lo, a_hi = 1 / grid[min(i + 1, len(grid) - 1)], 1 / grid[max(i - 1, 0)]

    def f(a: float) -> float:
        return nll(logits, targets, 1 / a)

    c, d = a_hi - _GOLDEN * (a_hi - a_lo), a_lo + _GOLDEN * (a_hi - a_lo)
    fc, fd = f(c), f(d)
    while a_hi - a_lo > tol * max(1.0, a_lo):
        if fc < fd:
            a_hi, d, fd = d, c, fc
            c = a_hi - _GOLDEN * (a_hi - a_lo)
            fc = f(c)
        else:
            a_lo, c, fc = c, d, fd
            d = a_lo + _GOLDEN * (a_hi - a_lo)
            fd = f(d)
    return 1 / ((a_lo + a_hi) / 2)


@dataclass
class TemperatureFit:
    """Temperature scaling of the teacher on ``samples`` samples of ``split``."""

    temperature: float
    split: str
    samples: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def calibrate(logits: torch.Tensor, targets: torch.Tensor, split: str = "validation") -> TemperatureFit:
    from distill.metrics import expected_calibration_error

    t = fit_temperature(logits, targets)
    return TemperatureFit(
        temperature=t, split=split, samples=len(targets),
        nll_before=nll(logits, targets), nll_after=nll(logits, targets, t),
        ece_before=expected_calibration_error(logits, targets),
        ece_after=expected_calibration_error(logits / t, targets),
    )


# ------------------------------------------------------------------------------ the gate
@dataclass
class GateResult:
    """The gate's decision: ``failures`` say why it failed (empty when it passed)."""

    enabled: bool
    accuracy: float
    min_accuracy: float | None = None
    baseline_accuracy: float | None = None
    require_better_than_baseline: bool = True
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    temperature: TemperatureFit | None = None

    @property
    def passed(self) -> bool:
        return not self.enabled or not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["suggested_temperature"] = self.temperature.temperature if self.temperature else None
        return out

    def summary(self) -> str:
        if not self.enabled:
            return "teacher gate: disabled"
        if self.failures:
            return "teacher gate: FAILED: " + "; ".join(self.failures)
        checks = []
        if self.min_accuracy is not None:
            checks.append(f"accuracy {100 * self.accuracy:.2f}% ≥ {100 * self.min_accuracy:.2f}%")
        if self.baseline_accuracy is not None and self.require_better_than_baseline:
            checks.append(f"{100 * self.accuracy:.2f}% > student alone {100 * self.baseline_accuracy:.2f}%")
        pending = self.require_better_than_baseline and self.baseline_accuracy is None
        return ("teacher gate: passed" + (f" ({', '.join(checks)})" if checks else "")
                + ("; the comparison with the student alone follows its first baseline" if pending else ""))

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise DistillError(
                f"teacher quality gate failed: {'; '.join(self.failures)}. Train a better teacher, or "
                f"override with {OVERRIDE} (or relax teacher.gate.min_accuracy / "
                "teacher.gate.require_better_than_baseline)"
            )

    def check_baseline(self, baseline_accuracy: float) -> "GateResult":
        """Record the student-alone accuracy and fail unless the teacher beats it (when required)."""
        self.baseline_accuracy = baseline_accuracy
        if self.enabled and self.require_better_than_baseline and not self.accuracy > baseline_accuracy:
            self.failures.append(
                f"teacher accuracy {100 * self.accuracy:.2f}% is not better than the student trained "
                f"alone ({100 * baseline_accuracy:.2f}%): distillation can only pull the student towards "
                "a worse model"
            )
        return self


def teacher_gate(
    accuracy: float,
    *,
    min_accuracy: float | None = None,
    baseline_accuracy: float | None = None,
    require_better_than_baseline: bool = True,
    per_class_accuracy: list[float] | None = None,
    ece: float | None = None,
    temperature: TemperatureFit | None = None,
    enabled: bool = True,
) -> GateResult:
    """Pass or fail a teacher from its test metrics (accuracies are fractions in [0, 1]).

    Fails when ``accuracy < min_accuracy``, or when ``require_better_than_baseline`` and
    ``baseline_accuracy`` (the student trained alone) is given and the teacher is not strictly
    better. Per-class accuracy, ECE and the fitted temperature add notes, not failures.
    """
    result = GateResult(enabled=enabled, accuracy=accuracy, min_accuracy=min_accuracy,
                        require_better_than_baseline=require_better_than_baseline, temperature=temperature)
    if enabled and min_accuracy is not None and accuracy < min_accuracy:
        result.failures.append(
            f"teacher accuracy {100 * accuracy:.2f}% is below teacher.gate.min_accuracy {100 * min_accuracy:.2f}%"
        )
    if baseline_accuracy is not None:
        result.check_baseline(baseline_accuracy)
    if per_class_accuracy:
        known = [(c, a) for c, a in enumerate(per_class_accuracy) if not math.isnan(a)]
        worst = sorted(known, key=lambda ca: ca[1])[:3]
        if worst and worst[0][1] < accuracy - 0.1:
            listed = ", ".join(f"class {c} {100 * a:.1f}%" for c, a in worst)
            result.notes.append(f"weakest classes of the teacher: {listed} (overall {100 * accuracy:.1f}%)")
    if temperature is not None:
        t = temperature
        direction = "over-confident" if t.temperature > 1.05 else "under-confident" if t.temperature < 0.95 else "calibrated"
        result.notes.append(
            f"suggested temperature {t.temperature:.2f} (temperature scaling on {t.samples} {t.split} samples: "
            f"NLL {t.nll_before:.3f} → {t.nll_after:.3f}, ECE {100 * t.ece_before:.2f}% → "
            f"{100 * t.ece_after:.2f}%; the teacher is {direction})"
        )
    elif ece is not None:
        result.notes.append(f"teacher ECE {100 * ece:.2f}%")
    return result


def assess_teacher(
    spec, teacher, prepared, teacher_logits: torch.Tensor, targets: torch.Tensor, baseline_enabled: bool = True,
    calibration=None,
) -> GateResult:
    """The gate of a run (``spec``: the recipe's ``teacher.gate``) on the teacher's test logits,
    with the temperature fitted on the validation split, or on ``calibration`` (a ``(loader,
    name)`` of training samples) when there is none: never on the test split.
    Raises :class:`DistillError` when the accuracy threshold fails; the baseline condition is
    checked later with :meth:`GateResult.check_baseline`."""
    from distill.metrics import accuracy, expected_calibration_error, per_class_accuracy, predict

    acc = accuracy(teacher_logits, targets)
    if not spec.enabled:
        return GateResult(enabled=False, accuracy=acc, min_accuracy=spec.min_accuracy,
                          require_better_than_baseline=spec.require_better_than_baseline)
    if prepared.val_loader is not None:
        val_logits, val_targets = predict(teacher, prepared.val_loader)
        fit = calibrate(val_logits, val_targets, "validation")
    elif calibration is not None:
        loader, name = calibration
        fit = calibrate(*predict(teacher, loader), name)
    else:
        fit = None
    result = teacher_gate(
        acc, min_accuracy=spec.min_accuracy, require_better_than_baseline=spec.require_better_than_baseline,
        per_class_accuracy=per_class_accuracy(teacher_logits, targets, prepared.data.num_classes),
        ece=expected_calibration_error(teacher_logits, targets), temperature=fit,
    )
    if spec.require_better_than_baseline and not baseline_enabled:
        result.notes.append("the baseline stage is disabled: the teacher was not compared with the student alone")
    result.raise_if_failed()
    return result
