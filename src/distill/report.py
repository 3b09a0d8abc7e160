"""The evidence a run ends with: a table, a verdict and plots, from ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoints import atomic_write
from distill.errors import DistillError
from distill.logbook import read_metrics

ROLES = (("teacher", "teacher"), ("baseline", "baseline (no teacher)"), ("student", "distilled"))


def _pct(summary: dict, key: str) -> str:
    if key not in summary:
        return "–"
    value = 100 * summary[key]
    std = summary.get(f"{key}_std")
    return f"{value:.2f} ± {100 * std:.2f}" if std else f"{value:.2f}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the evidence table: role, model, accuracy, agreement, KL, ECE, params, latency."""
    key = results.get("primary_metric", "accuracy")
    rows = []
    for role, label in ROLES:
        s = results.get(role)
        if not s:
            continue
        kl = s.get("kl_to_teacher")
        rows.append([
            label,
            str(s.get("model", "")),
            _pct(s, key),
            _pct(s, "agreement") if role != "teacher" else "100",
            f"{kl:.4f}" if kl is not None else "–",
            f"{100 * s['ece']:.2f}" if "ece" in s else "–",
            f"{s['params']:,}",
            f"{s['latency_ms']:.3f}" if "latency_ms" in s else "–",
            *(_plain(s, extra) for extra in results.get("report_metrics", [])),
        ])
    return rows


def _plain(summary: dict, key: str) -> str:
    """A metric that is not a fraction (e.g. perplexity), with its std over seeds."""
    if key not in summary:
        return "–"
    std = summary.get(f"{key}_std")
    return f"{summary[key]:.4g} ± {std:.2g}" if std else f"{summary[key]:.4g}"


HEADER = ["", "model", "accuracy %", "agreement %", "KL(t‖s)", "ECE %", "params", "latency ms"]


def header(results: dict[str, Any]) -> list[str]:
    """The table's columns; the first metric is the task's primary one (accuracy, NDCG@10, mAP...)."""
    return ["", "model", f"{results.get('primary_metric', 'accuracy')} %", *HEADER[3:],
            *results.get("report_metrics", [])]


def markdown_table(results: dict[str, Any]) -> str:
    head = header(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def plot_losses(run_dir: Path, out: Path) -> bool:
    """Training loss terms of every stage over epochs, one panel per stage kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted((run_dir / "stages").glob("*/metrics.csv"))
    if not stages:
        return False
    order = {"teacher": 0, "baseline": 1, "student": 2}
    kinds = sorted({p.parent.name.split("-seed")[0] for p in stages}, key=lambda k: (order.get(k, 9), k))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for path in stages:
            if path.parent.name.split("-seed")[0] != kind:
                continue
            rows = read_metrics(path)
            epochs = [r["epoch"] for r in rows]
            for key in rows[0]:
                if key.startswith("train_"):
                    ax.plot(epochs, [r.get(key) for r in rows], label=f"{path.parent.name}: {key[6:]}")
        ax.set_title(kind)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_params(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = results.get("primary_metric", "accuracy")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for role, label in ROLES:
        s = results.get(role)
        if not s:
            continue
        ax.errorbar(s["params"], 100 * s[key], yerr=100 * s.get(f"{key}_std", 0.0),
                    fmt="o", capsize=4, label=label)
    from matplotlib.ticker import EngFormatter, FixedLocator, NullLocator

    ax.set_xscale("log")
    sizes = sorted({results[r]["params"] for r, _ in ROLES if results.get(r)})
    ax.xaxis.set_major_locator(FixedLocator(sizes))  # label the models' own sizes
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(EngFormatter(places=2))
    ax.margins(x=0.3)
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"test {key} %")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def gate_lines(results: dict[str, Any]) -> list[str]:
    """The teacher quality gate's outcome and the suggested temperature (:mod:`distill.quality`)."""
    gate = results.get("teacher_gate")
    if not gate:
        return []
    if not gate.get("enabled", True):
        return ["teacher gate: disabled"]
    lines = ["teacher gate: " + ("passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("failures", [])))]
    return lines + list(gate.get("notes", []))


def write_report(run_dir: str | Path, results: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir)
    lines = [f"# distill report: {results.get('recipe', run_dir.name)}", ""]
    lines.append(
        f"Data: `{results.get('data')}`; seeds: {results.get('seeds')}; "
        f"{results.get('primary_metric', 'accuracy')} is the test-set mean "
        f"± std over seeds; latency is the median CPU time of one sample at batch 1 with "
        f"{results.get('threads')} thread(s)."
    )
    lines += ["", markdown_table(results), "", f"**Verdict:** {results.get('verdict', '')}", ""]
    lines += [f"- {line}" for line in gate_lines(results)] + ([""] if gate_lines(results) else [])
    plot_accuracy_vs_params(results, run_dir / "accuracy_vs_params.png")
    lines += ["![accuracy vs parameters](accuracy_vs_params.png)", ""]
    if plot_losses(run_dir, run_dir / "losses.png"):
        lines += ["![loss terms over training](losses.png)", ""]
    text = "\n".join(lines).encode()
    atomic_write(run_dir / "report.md", lambda f: f.write(text))
    return run_dir / "report.md"


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise DistillError(f"{run_dir} has no results.json: is it a finished run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
