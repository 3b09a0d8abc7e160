"""The report a user looks at: the training-curve plot (one mean line per loss term with a seed
band, the validation metric below, legible fonts), accuracy against parameters, latency and size,
and a self-contained report.html beside report.md."""

from __future__ import annotations

import base64
import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from distill import plots  # noqa: E402
from distill.report import write_report  # noqa: E402

pytestmark = pytest.mark.fast

EPOCHS = [1, 2, 3, 4]


def write_stage(run_dir: Path, name: str, columns: dict[str, list[float]]) -> None:
    path = run_dir / "stages" / name / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = ["epoch", *columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for i, epoch in enumerate(EPOCHS):
            writer.writerow({"epoch": epoch, **{k: v[i] for k, v in columns.items()}})


def stage_columns(offset: float, terms: tuple[str, ...], val: bool) -> dict[str, list[float]]:
    cols = {"lr": [0.1] * 4}
    total = [0.0] * 4
    for j, term in enumerate(terms):
        values = [(2.0 + j) / e + offset for e in EPOCHS]
        cols[f"train_{term}"] = values
        total = [t + v for t, v in zip(total, values)]
    cols["train_loss"] = total
    if val:
        cols["val_accuracy"] = [0.2 * e + offset for e in EPOCHS]
    return cols


def make_run(run_dir: Path, val: bool = True) -> Path:
    write_stage(run_dir, "teacher", stage_columns(0.0, ("ce",), val))
    for seed, offset in ((0, 0.0), (1, 0.1)):
        write_stage(run_dir, f"baseline-seed{seed}", stage_columns(offset, ("ce",), val))
        write_stage(run_dir, f"student-seed{seed}", stage_columns(offset, ("soft", "hint"), val))
    return run_dir


RESULTS = {
    "recipe": "tiny <b>&</b>",
    "task": "classification",
    "primary_metric": "accuracy",
    "data": "digits",
    "seeds": [0, 1],
    "threads": 1,
    "teacher": {"accuracy": 0.9, "agreement": 1.0, "ece": 0.05, "model": "resnet20", "params": 270_000,
                "size_bytes": 1_100_000, "latency_ms": 1.5, "per_seed": None},
    "baseline": {"accuracy": 0.80, "accuracy_std": 0.01, "agreement": 0.8, "agreement_std": 0.01,
                 "kl_to_teacher": 0.3, "ece": 0.04, "model": "resnet8", "params": 78_000, "size_bytes": 320_000,
                 "latency_ms": 0.4, "per_seed": {"accuracy": [0.79, 0.81]}},
    "student": {"accuracy": 0.84, "accuracy_std": 0.01, "agreement": 0.9, "agreement_std": 0.01,
                "kl_to_teacher": 0.1, "ece": 0.03, "model": "resnet8", "params": 78_000, "size_bytes": 320_000,
                "latency_ms": 0.4, "per_seed": {"accuracy": [0.83, 0.85]}},
    "verdict": "distillation helped: +4.00 points over the student trained alone, beyond the spread",
    "teacher_gate": {"enabled": True, "passed": True, "notes": ["suggested temperature 2.0 <x>"]},
}


def axis_titled(fig, prefix: str):
    found = [ax for ax in fig.axes if ax.get_title().startswith(prefix)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


def test_losses_figure_draws_one_mean_line_per_loss_term_with_a_band_over_seeds(tmp_path):
    fig = plots.losses_figure(make_run(tmp_path))
    try:
        student = axis_titled(fig, "distilled: training loss (2 seeds)")
        assert [line.get_label() for line in student.get_lines()] == ["soft", "hint", "total"]  # not 2 x 3 curves
        soft = student.get_lines()[0]
        seed0 = [2.0 / e for e in EPOCHS]
        assert list(soft.get_xdata()) == EPOCHS
        assert list(soft.get_ydata()) == pytest.approx([v + 0.05 for v in seed0])  # the mean of the two seeds
        assert len(student.collections) == 3  # one min-max band per curve
        baseline = axis_titled(fig, "baseline (no teacher): training loss")
        assert [line.get_label() for line in baseline.get_lines()] == ["ce"]  # a lone term is not drawn twice
        teacher = axis_titled(fig, "teacher: training loss")
        assert len(teacher.collections) == 0  # one run: no band
    finally:
        plt.close(fig)


def test_losses_figure_puts_the_validation_metric_under_each_role_on_one_scale(tmp_path):
    fig = plots.losses_figure(make_run(tmp_path))
    try:
        assert len(fig.axes) == 6  # 3 roles x (training loss, validation metric)
        roles = ("teacher", "baseline (no teacher)", "distilled")
        vals = [axis_titled(fig, f"{role}: validation accuracy") for role in roles]
        student = vals[2]
        assert student.get_ylabel() == "accuracy %"
        assert list(student.get_lines()[0].get_ydata()) == pytest.approx([100 * (0.2 * e + 0.05) for e in EPOCHS])
        assert len({ax.get_ylim() for ax in vals}) == 1  # the roles compare at a glance
        loss = axis_titled(fig, "distilled: training loss")
        assert loss.get_position().y0 > student.get_position().y0  # the loss on top, validation below
    finally:
        plt.close(fig)


def test_losses_figure_without_validation_has_one_row(tmp_path):
    fig = plots.losses_figure(make_run(tmp_path, val=False))
    try:
        assert len(fig.axes) == 3 and all("training loss" in ax.get_title() for ax in fig.axes)
    finally:
        plt.close(fig)
    assert plots.losses_figure(tmp_path / "empty") is None


def test_losses_png_is_about_1200_px_wide_with_legible_fonts(tmp_path):
    run = make_run(tmp_path / "run")
    fig = plots.losses_figure(run)
    small = [(t.get_text(), t.get_fontsize()) for t in texts(fig) if t.get_fontsize() < 10]
    plt.close(fig)
    assert small == []  # legends, ticks and titles at 10 pt or more, for a 1200 px image
    assert plots.plot_losses(run, tmp_path / "losses.png")
    width, height = plt.imread(tmp_path / "losses.png").shape[1::-1]
    assert 1100 <= width <= 1300 and height < width


def test_accuracy_vs_cost_shows_parameters_latency_and_size(tmp_path):
    fig = plots.accuracy_vs_cost_figure(RESULTS)
    try:
        assert [ax.get_title() for ax in fig.axes] == [
            "accuracy vs parameters", "accuracy vs latency", "accuracy vs size"]
        assert [ax.get_xlabel() for ax in fig.axes] == [
            "parameters", "CPU latency at batch 1 (ms)", "size of the weights (bytes)"]
        latency = fig.axes[1]
        points = sorted((round(float(line.get_xdata()[0]), 6), round(float(line.get_ydata()[0]), 6))
                        for line in latency.get_lines() if line.get_marker() not in ("None", "", "_"))
        assert points == [(0.4, 80.0), (0.4, 84.0), (1.5, 90.0)]
        assert "3.75× the student" in [t.get_text() for t in latency.texts]  # what distilling saves
        assert all(t.get_fontsize() >= 10 for t in texts(fig))
    finally:
        plt.close(fig)


def test_accuracy_vs_cost_leaves_out_latency_when_it_was_not_measured():
    results = json.loads(json.dumps(RESULTS))
    for role in ("teacher", "baseline", "student"):
        del results[role]["latency_ms"]
    fig = plots.accuracy_vs_cost_figure(results)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["accuracy vs parameters", "accuracy vs size"]
    finally:
        plt.close(fig)


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "data")]
        self._in_cell = tag == "td"

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_cell:
            self.cells.append(data)


def test_write_report_writes_a_self_contained_html_beside_report_md(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "results.json").write_text(json.dumps(RESULTS))
    assert write_report(run) == run / "report.md"
    md = (run / "report.md").read_text()
    assert "![" in md and "(accuracy_vs_params.png)" in md and "(losses.png)" in md
    html = (run / "report.html").read_text()
    page = Page()
    page.feed(html)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)  # nothing to run or fetch
    assert not re.search(r"url\(|@import|https?://", html)
    assert page.tags.count("img") == 2 and len(page.links) == 2
    for link, name in zip(page.links, ("accuracy_vs_params.png", "losses.png")):
        assert link.startswith("data:image/png;base64,")
        assert base64.b64decode(link.split(",", 1)[1]) == (run / name).read_bytes()  # the plots themselves
    assert ["distilled", "resnet8", "84.00 ± 1.00", "90.00 ± 1.00"] == page.cells[16:20]
    text = "".join(page.text)
    assert "distillation helped: +4.00 points" in text and "teacher gate: passed" in text
    assert "distill report: tiny <b>&</b>" in text and "<b>&</b>" not in html  # escaped, not markup
    assert "suggested temperature 2.0 <x>" in text


def test_report_without_curves_still_writes_html(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    write_report(tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert html.count("<img") == 1 and not (tmp_path / "losses.png").exists()
