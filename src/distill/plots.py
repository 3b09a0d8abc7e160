"""The plots of a run's report, drawn to be read at the size report.html shows them (~1200 px).

- :func:`losses_figure` (``losses.png``): one column per role (teacher, baseline, distilled, and
  any assistant or born-again generation), the training loss terms on top and, when the stage
  logged one, the validation metric below (shared y axis, so the roles compare at a glance).
  The seeds of a role are one mean line with a light min-max band, not overlapping duplicates.
- :func:`accuracy_vs_cost_figure` (``accuracy_vs_params.png``): the test metric against
  parameters, CPU latency at batch 1 and size in bytes, side by side.

Both return a matplotlib ``Figure`` (tests inspect it); ``plot_*`` save it as PNG.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.logbook import read_metrics
from distill.run_result import RunResult

WIDTH_IN = 12.0  # inches; at DPI that is 1200 px, the width report.html shows plots at
DPI = 100
STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 12,
    "axes.spines.top": False, "axes.spines.right": False,
}
ROLE_ORDER = {"teacher": 0, "assistant": 1, "baseline": 2, "student-gen": 3, "student": 4}
ROLE_LABELS = {"teacher": "teacher", "baseline": "baseline (no teacher)", "student": "distilled"}
ROLE_MARKERS = {"teacher": ("s", "C0"), "baseline": ("o", "C1"), "student": ("D", "C2")}
MAX_COLUMNS = 3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def role_of(stage: str) -> str:
    """``student-seed1`` -> ``student``; ``student-gen1-seed0`` -> ``student-gen1``; ``teacher``."""
    return stage.split("-seed")[0]


def role_rank(role: str) -> tuple[int, str]:
    """Teacher, assistants, baseline, born-again generations, distilled student: training order."""
    kind = "student-gen" if role.startswith("student-gen") else role.rstrip("0123456789")
    return ROLE_ORDER.get(kind, 9), role


def role_label(role: str) -> str:
    return ROLE_LABELS.get(role, role)


def is_fraction(metric: str, values: Sequence[float] = ()) -> bool:
    """Shown as a percentage: accuracy, NDCG, mAP... (not perplexity or a loss)."""
    return metric not in ("perplexity", "loss", "kl_to_teacher") and all(0.0 <= v <= 1.0 for v in values)


Curve = tuple[list[float], list[float]]


def mean_band(series: Sequence[Curve]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seeds' ``(epochs, values)`` curves as ``epochs, mean, low, high`` (min-max over the seeds
    that reached each epoch; a seed stopped early simply stops contributing)."""
    by_epoch: dict[float, list[float]] = {}
    for epochs, values in series:
        for e, v in zip(epochs, values):
            if v is not None and math.isfinite(v):
                by_epoch.setdefault(e, []).append(v)
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def _column(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if key in r and "epoch" in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss_terms(runs: list[list[dict[str, float]]]) -> list[tuple[str, str]]:
    """``(column, label)`` of the loss curves worth drawing: each term, plus the total when there
    is more than one term (a lone term equal to the total is drawn once)."""
    columns = list(dict.fromkeys(k for rows in runs for r in rows for k in r if k.startswith("train_")))
    terms = [c for c in columns if c != "train_loss"]
    if not terms:
        return [("train_loss", "loss")] if "train_loss" in columns else []
    out = [(c, c[len("train_"):]) for c in terms]
    if len(terms) > 1 and "train_loss" in columns:
        out.append(("train_loss", "total"))
    return out


def _draw(ax, series, label: str, color, scale: float = 1.0, **line) -> None:
    epochs, mean, low, high = mean_band(series)
    if not epochs:
        return
    ax.plot(epochs, [scale * v for v in mean], color=color, label=label, lw=2, **line)
    if len(series) > 1:
        ax.fill_between(epochs, [scale * v for v in low], [scale * v for v in high], color=color, alpha=0.2, lw=0)


def _scale_y(ax, values: list[float]) -> None:
    """Log y when the curves span more than 30x and are positive, with plain tick labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def losses_figure(run_dir: str | Path, primary_metric: str = "accuracy"):
    """The training curves of ``run_dir/stages/*/metrics.csv`` (see the module), or ``None`` when
    the run logged none."""
    stages = sorted(Path(run_dir).glob("stages/*/metrics.csv"))
    runs: dict[str, list[list[dict[str, float]]]] = {}
    for path in stages:
        rows = read_metrics(path)
        if rows:
            runs.setdefault(role_of(path.parent.name), []).append(rows)
    if not runs:
        return None
    roles = sorted(runs, key=role_rank)
    val_key = f"val_{primary_metric}"
    has_val = {r: any(val_key in row for rows in runs[r] for row in rows) for r in roles}
    blocks = math.ceil(len(roles) / MAX_COLUMNS)
    columns = min(len(roles), MAX_COLUMNS)
    per_block = 2 if any(has_val.values()) else 1
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(WIDTH_IN, 3.4 * per_block * blocks + 0.5), dpi=DPI, layout="constrained")
        grid = fig.add_gridspec(per_block * blocks, columns)
        val_axes = []
        for i, role in enumerate(roles):
            block, col = divmod(i, MAX_COLUMNS)
            seeds = len(runs[role])
            ax = fig.add_subplot(grid[per_block * block, col])
            plotted: list[float] = []
            for j, (key, label) in enumerate(_loss_terms(runs[role])):
                series = [_column(rows, key) for rows in runs[role]]
                plotted += [v for _, values in series for v in values]
                style = {"ls": "--"} if label == "total" else {}
                _draw(ax, series, label, "0.25" if label == "total" else f"C{j}", **style)
            _scale_y(ax, plotted)
            seeds_note = f" ({seeds} seeds)" if seeds > 1 else ""
            ax.set_title(f"{role_label(role)}: training loss{seeds_note}")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right", frameon=False)
            _integer_epochs(ax)
            if per_block == 1:
                ax.set_xlabel("epoch")
                continue
            vax = fig.add_subplot(grid[per_block * block + 1, col], sharex=ax)
            _integer_epochs(vax)
            vax.set_xlabel("epoch")
            if not has_val[role]:
                vax.text(0.5, 0.5, "no validation metric logged", ha="center", va="center",
                         transform=vax.transAxes, color="0.4")
                vax.set_yticks([])
                continue
            series = [_column(rows, val_key) for rows in runs[role]]
            values = [v for _, vs in series for v in vs]
            pct = is_fraction(primary_metric, values)
            _draw(vax, series, f"val {primary_metric}", "C3", scale=100.0 if pct else 1.0)
            vax.set_title(f"{role_label(role)}: validation {primary_metric}")
            vax.set_ylabel(f"{primary_metric}{' %' if pct else ''}")
            vax.grid(alpha=0.3)
            val_axes.append(vax)
        if len(val_axes) > 1:  # one y range for every role's validation curve: they compare directly
            low = min(a.get_ylim()[0] for a in val_axes)
            high = max(a.get_ylim()[1] for a in val_axes)
            for a in val_axes:
                a.set_ylim(low, high)
        if any(len(r) > 1 for r in runs.values()):
            fig.suptitle("lines: mean over seeds; shaded: min–max over seeds", color="0.3")
    return fig


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


COSTS = (
    ("params", "parameters", "{key} vs parameters"),
    ("latency_ms", "CPU latency at batch 1 (ms)", "{key} vs latency"),
    ("size_bytes", "size of the weights (bytes)", "{key} vs size"),
)


def accuracy_vs_cost_figure(results: RunResult | dict[str, Any]):
    """The test metric of each role (mean ± std over seeds) against parameters, latency (ms at
    batch 1) and size (bytes), one panel each; a cost no role measured (latency with
    ``evaluate.latency: false``) is left out."""
    from matplotlib.ticker import EngFormatter, FixedLocator, FuncFormatter, NullLocator

    results = RunResult.parse(results)
    key = results.primary_metric
    measured = {name: role for name, role in results.roles() if role.metric(key) is not None}
    roles = list(measured)
    panels = [c for c in COSTS if any(getattr(measured[r], c[0]) is not None for r in roles)]
    values = [measured[r].metric(key) for r in roles]
    pct = is_fraction(key, values)
    scale = 100.0 if pct else 1.0
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(WIDTH_IN, 4.3), dpi=DPI, sharey=True,
                                 squeeze=False, layout="constrained")
        formats = {
            "params": EngFormatter(places=1, sep=""),
            "latency_ms": FuncFormatter(lambda v, _: f"{v:.3g} ms"),
            "size_bytes": EngFormatter(unit="B", places=1),
        }
        for ax, (cost, xlabel, title) in zip(axes[0], panels):
            for role in roles:
                s = measured[role]
                if getattr(s, cost) is None:
                    continue
                marker, color = ROLE_MARKERS[role]
                face = "white" if role == "baseline" else color
                ax.errorbar(getattr(s, cost), scale * s.metric(key), yerr=scale * s.std(key), fmt=marker,
                            color=color, mfc=face, mew=2, ms=9, capsize=5, label=role_label(role), zorder=3)
            teacher, student = measured.get("teacher"), measured.get("student") or measured.get("baseline")
            if teacher is not None and student is not None and getattr(teacher, cost) is not None \
                    and getattr(student, cost):  # what the student saves
                t_cost = getattr(teacher, cost)
                ax.annotate(f"{t_cost / getattr(student, cost):.3g}× the student", (t_cost, scale * teacher.metric(key)),
                            xytext=(0, 12), textcoords="offset points", ha="center", fontsize=10, color="0.3")
            xs = sorted({getattr(measured[r], cost) for r in roles if getattr(measured[r], cost) is not None})
            positive = all(x > 0 for x in xs)
            if positive:
                ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(xs))  # label the models' own costs
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(formats[cost])
            ax.margins(x=0.35 if len(xs) > 1 else 0.5, y=0.25)
            if len(xs) == 1 and positive:
                ax.set_xlim(xs[0] / 2, xs[0] * 2)
            ax.set_xlabel(xlabel)
            ax.set_title(title.format(key=key))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"test {key}{' %' if pct else ''}")
        if pct:  # the margins should not suggest more than 100%
            low, high = axes[0][0].get_ylim()
            axes[0][0].set_ylim(max(low, 0.0), min(high, 101.0))
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def save(fig, out: str | Path) -> Path:
    plt = _pyplot()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return Path(out)


def plot_losses(run_dir: str | Path, out: str | Path, primary_metric: str = "accuracy") -> bool:
    """Save :func:`losses_figure` to ``out``; False (nothing written) when there are no curves."""
    fig = losses_figure(run_dir, primary_metric)
    if fig is None:
        return False
    save(fig, out)
    return True


def plot_accuracy_vs_cost(results: RunResult | dict[str, Any], out: str | Path) -> Path:
    """Save :func:`accuracy_vs_cost_figure` to ``out``."""
    return save(accuracy_vs_cost_figure(results), out)
