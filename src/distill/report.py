"""The evidence a run ends with: a table, a verdict and plots, from ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.checkpoints import atomic_write
from distill.run_result import ROLES, RoleResult, RunResult


def _pct(role: RoleResult, key: str) -> str:
    value = role.metric(key)
    if value is None:
        return "–"
    std = role.std(key)
    return f"{100 * value:.2f} ± {100 * std:.2f}" if std else f"{100 * value:.2f}"


def table_rows(results: RunResult | dict[str, Any]) -> list[list[str]]:
    """Rows of the evidence table: role, model, accuracy, agreement, KL, ECE, params, latency."""
    results = RunResult.parse(results)
    key = results.primary_metric
    labels = dict(ROLES)
    rows = []
    for name, role in results.roles():
        kl, ece = role.metric("kl_to_teacher"), role.metric("ece")
        rows.append([
            labels[name],
            role.model,
            _pct(role, key),
            _pct(role, "agreement") if name != "teacher" else "100",
            f"{kl:.4f}" if kl is not None else "–",
            f"{100 * ece:.2f}" if ece is not None else "–",
            f"{role.params:,}" if role.params is not None else "–",
            f"{role.latency_ms:.3f}" if role.latency_ms is not None else "–",
            *(_plain(role, extra) for extra in results.report_metrics),
        ])
    return rows


def _plain(role: RoleResult, key: str) -> str:
    """A metric that is not a fraction (e.g. perplexity), with its std over seeds."""
    value = role.metric(key)
    if value is None:
        return "–"
    std = role.std(key)
    return f"{value:.4g} ± {std:.2g}" if std else f"{value:.4g}"


HEADER = ["", "model", "accuracy %", "agreement %", "KL(t‖s)", "ECE %", "params", "latency ms"]


def header(results: RunResult | dict[str, Any]) -> list[str]:
    """The table's columns; the first metric is the task's primary one (accuracy, NDCG@10, mAP...)."""
    results = RunResult.parse(results)
    return ["", "model", f"{results.primary_metric} %", *HEADER[3:], *results.report_metrics]


def markdown_table(results: RunResult | dict[str, Any]) -> str:
    head = header(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def plot_losses(run_dir: Path, out: Path, primary_metric: str = "accuracy") -> bool:
    """Training curves of every stage (:func:`distill.plots.losses_figure`); False when none."""
    from distill.plots import plot_losses as draw

    return draw(run_dir, out, primary_metric)


def plot_accuracy_vs_params(results: RunResult, out: Path) -> None:
    """The test metric against parameters, latency and size (:func:`distill.plots.accuracy_vs_cost_figure`)."""
    from distill.plots import plot_accuracy_vs_cost

    plot_accuracy_vs_cost(results, out)


def gate_lines(results: RunResult | dict[str, Any]) -> list[str]:
    """The teacher quality gate's outcome and the suggested temperature (:mod:`distill.quality`)."""
    gate = RunResult.parse(results).teacher_gate
    if not gate:
        return []
    if not gate.get("enabled", True):
        return ["teacher gate: disabled"]
    lines = ["teacher gate: " + ("passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("failures", [])))]
    return lines + list(gate.get("notes", []))


PLOTS = (
    ("accuracy_vs_params.png", "test metric against parameters, CPU latency at batch 1 and size"),
    ("losses.png", "training loss terms and validation metric over epochs"),
)


def intro(results: RunResult | dict[str, Any], markdown: bool = False) -> str:
    results = RunResult.parse(results)
    data = f"`{results.data}`" if markdown else str(results.data)
    return (
        f"Data: {data}; seeds: {results.seeds}; "
        f"{results.primary_metric} is the test-set mean "
        f"± std over seeds; latency is the median CPU time of one sample at batch 1 with "
        f"{results.threads} thread(s)."
    )


def write_report(run_dir: str | Path, results: RunResult | dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, the self-contained ``report.html`` and their plots into ``run_dir``;
    return the path of ``report.md``."""
    run_dir = Path(run_dir)
    results = load_results(run_dir) if results is None else RunResult.parse(results)
    plots = []
    plot_accuracy_vs_params(results, run_dir / PLOTS[0][0])
    plots.append(PLOTS[0])
    if plot_losses(run_dir, run_dir / PLOTS[1][0], results.primary_metric):
        plots.append(PLOTS[1])
    title = f"distill report: {results.recipe or run_dir.name}"
    gates = gate_lines(results)
    lines = [f"# {title}", "", intro(results, markdown=True)]
    lines += ["", markdown_table(results), "", f"**Verdict:** {results.verdict}", ""]
    lines += [f"- {line}" for line in gates] + ([""] if gates else [])
    lines += [line for name, alt in plots for line in (f"![{alt}]({name})", "")]
    text = "\n".join(lines).encode()
    atomic_write(run_dir / "report.md", lambda f: f.write(text))
    page = html_report(title, results, [(alt, (run_dir / name).read_bytes()) for name, alt in plots]).encode()
    atomic_write(run_dir / "report.html", lambda f: f.write(page))
    return run_dir / "report.md"


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       max-width: 1240px; margin: 24px auto; padding: 0 20px; color: #1d1d1f; }
h1 { font-size: 24px; margin: 0 0 8px; }
p.intro { color: #555; margin: 0 0 16px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { padding: 6px 12px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; font-weight: 600; }
td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
tr.student td { font-weight: 600; }
.verdict { padding: 10px 14px; border-left: 4px solid #999; background: #f6f6f6; margin: 12px 0; }
.verdict.helped { border-color: #2ca02c; background: #f3faf3; }
.verdict.hurt { border-color: #d62728; background: #fdf3f3; }
ul.gate { color: #444; }
figure { margin: 20px 0; }
figure img { width: 100%; max-width: 1200px; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; }
"""


def html_report(title: str, results: RunResult | dict[str, Any], images: list[tuple[str, bytes]]) -> str:
    """One HTML page holding the table, the verdict, the gate and ``images`` (``(caption, png)``)
    as base64 data URIs: no other file, no script, nothing fetched."""
    import base64
    from html import escape

    results = RunResult.parse(results)
    head = "".join(f"<th>{escape(h)}</th>" for h in header(results))
    labels = {label: role for role, label in ROLES}
    body = "\n".join(
        f'<tr class="{labels.get(row[0], "")}">' + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(results)
    )
    verdict = results.verdict
    tone = next((t for t in ("helped", "hurt") if verdict.startswith(f"distillation {t}")), "")
    gates = gate_lines(results)
    gate = ("<ul class=\"gate\">" + "".join(f"<li>{escape(g)}</li>" for g in gates) + "</ul>") if gates else ""
    figures = "\n".join(
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
        for caption, png in images
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="intro">{escape(intro(results))}</p>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<p class="verdict {tone}"><strong>Verdict:</strong> {escape(verdict)}</p>
{gate}
{figures}
</body>
</html>
"""


def load_results(run_dir: str | Path) -> RunResult:
    """The typed results of a finished run directory (:meth:`RunResult.load`)."""
    return RunResult.load(run_dir)
