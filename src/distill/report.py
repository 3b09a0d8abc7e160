"""The evidence a run ends with: a table, a verdict and plots, from ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoints import atomic_write
from distill.errors import DistillError

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


def plot_losses(run_dir: Path, out: Path, primary_metric: str = "accuracy") -> bool:
    """Training curves of every stage (:func:`distill.plots.losses_figure`); False when none."""
    from distill.plots import plot_losses as draw

    return draw(run_dir, out, primary_metric)


def plot_accuracy_vs_params(results: dict[str, Any], out: Path) -> None:
    """The test metric against parameters, latency and size (:func:`distill.plots.accuracy_vs_cost_figure`)."""
    from distill.plots import plot_accuracy_vs_cost

    plot_accuracy_vs_cost(results, out)


def gate_lines(results: dict[str, Any]) -> list[str]:
    """The teacher quality gate's outcome and the suggested temperature (:mod:`distill.quality`)."""
    gate = results.get("teacher_gate")
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


def intro(results: dict[str, Any], markdown: bool = False) -> str:
    data = f"`{results.get('data')}`" if markdown else str(results.get("data"))
    return (
        f"Data: {data}; seeds: {results.get('seeds')}; "
        f"{results.get('primary_metric', 'accuracy')} is the test-set mean "
        f"± std over seeds; latency is the median CPU time of one sample at batch 1 with "
        f"{results.get('threads')} thread(s)."
    )


def write_report(run_dir: str | Path, results: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, the self-contained ``report.html`` and their plots into ``run_dir``;
    return the path of ``report.md``."""
    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir)
    plots = []
    plot_accuracy_vs_params(results, run_dir / PLOTS[0][0])
    plots.append(PLOTS[0])
    if plot_losses(run_dir, run_dir / PLOTS[1][0], results.get("primary_metric", "accuracy")):
        plots.append(PLOTS[1])
    title = f"distill report: {results.get('recipe', run_dir.name)}"
    gates = gate_lines(results)
    lines = [f"# {title}", "", intro(results, markdown=True)]
    lines += ["", markdown_table(results), "", f"**Verdict:** {results.get('verdict', '')}", ""]
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


def html_report(title: str, results: dict[str, Any], images: list[tuple[str, bytes]]) -> str:
    """One HTML page holding the table, the verdict, the gate and ``images`` (``(caption, png)``)
    as base64 data URIs: no other file, no script, nothing fetched."""
    import base64
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in header(results))
    labels = {label: role for role, label in ROLES}
    body = "\n".join(
        f'<tr class="{labels.get(row[0], "")}">' + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(results)
    )
    verdict = str(results.get("verdict", ""))
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


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise DistillError(f"{run_dir} has no results.json: is it a finished run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
