"""The documentation tells the truth: every figure README.md and docs/*.md print from a results file
equals the file's value at the printed rounding; every relative link (and its #anchor) resolves;
the README's test command is the one CI runs; the README's recipe is a valid recipe; the reference
pages name every preset, data set, loss and command-line option there is.

A figure is a ``Fig(doc, results file, snippet, values)``: the snippet is the doc's text with a
``{}`` where each number stands (whitespace, line breaks included, counts as one space), and each
value says where the number comes from (``J("results.student.accuracy", 100)``: a JSON path and a
scale, or any function of the parsed file). A number printed with d decimals must be within half a
unit of its d-th decimal of the value (``66.47`` for 0.66470000, ``3.8`` for 3.777; ``3.7`` fails).
To add a figure to a doc, add its line here.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"[-−+]?\d[\d,]*(?:\.\d+)?(?:e[-−+]?\d+)?"


# -------------------------------------------------------------------------------------- helpers
def J(path: str, scale: float = 1.0) -> Callable[[dict], float]:
    """The value at ``path`` (``a.b[2].c``) of a results file, times ``scale``."""
    keys = re.findall(r"\[\d+\]|[^.\[\]]+", path)

    def get(data: dict) -> float:
        for key in keys:
            data = data[int(key[1:-1])] if key.startswith("[") else data[key]
        return float(data) * scale

    get.__name__ = f"{path} x {scale:g}" if scale != 1 else path
    return get


def F(fn: Callable[[dict], float], name: str) -> Callable[[dict], float]:
    """A value computed from the file (a ratio, a difference, a count)."""
    fn.__name__ = name
    return fn


@dataclass(frozen=True)
class Fig:
    doc: str
    results: str
    snippet: str
    values: tuple

    def __str__(self) -> str:
        return f"{self.doc}: {self.snippet[:60]}"


@cache
def text_of(doc: str) -> str:
    return " ".join((ROOT / doc).read_text(encoding="utf-8").split())


@cache
def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def printed_value(text: str) -> tuple[float, float]:
    """The number ``text`` prints and half a unit of its last printed digit."""
    plain = text.replace(",", "").replace("−", "-").lstrip("+")
    mantissa, _, exponent = plain.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    unit = 10.0 ** (-decimals) * (10.0 ** int(exponent) if exponent else 1.0)
    return float(plain), 0.5 * unit


def agrees(text: str, value: float) -> bool:
    shown, half = printed_value(text)
    return abs(shown - value) <= half * (1 + 1e-9) + 1e-12


def find(fig: Fig) -> list[str]:
    """The numbers at the snippet's placeholders in the doc (the snippet must occur)."""
    snippet = " ".join(fig.snippet.split())
    parts = snippet.split("{}")
    assert len(parts) - 1 == len(fig.values), f"{fig}: {len(parts) - 1} placeholders, {len(fig.values)} values"
    pattern = f"({NUMBER})".join(re.escape(p) for p in parts)
    match = re.search(pattern, text_of(fig.doc))
    assert match, f"{fig.doc} no longer says: {snippet!r}"
    return list(match.groups())


# ------------------------------------------------------------------------------------ the figures
def _demo_rows(doc: str) -> list[Fig]:
    r = "results."
    return [
        Fig(doc, "demo.json", "| **demo** (MNIST-1D, 1,000 labels, {} seeds) teacher | cnn1d (width 64) | {} | {} | 100 | {} |",
            (F(lambda d: len(d["results"]["seeds"]), "len(seeds)"), J(r + "teacher.params"),
             J(r + "teacher.accuracy", 100), J(r + "teacher.latency_ms"))),
        Fig(doc, "demo.json", "| student alone | mlp 128-128 | {} | {} ± {} | {} | {} |",
            (J(r + "baseline.params"), J(r + "baseline.accuracy", 100), J(r + "baseline.accuracy_std", 100),
             J(r + "baseline.agreement", 100), J(r + "baseline.latency_ms"))),
        Fig(doc, "demo.json", "| distilled (function matching, T = 1) | mlp 128-128 | {} | **{} ± {}** | {} | {} |",
            (J(r + "student.params"), J(r + "student.accuracy", 100), J(r + "student.accuracy_std", 100),
             J(r + "student.agreement", 100), J(r + "student.latency_ms"))),
    ]


def _demo_output(doc: str) -> list[Fig]:
    """The table ``distill demo`` prints, as README.md and docs/results.md show it."""
    r = "results."
    return [
        Fig(doc, "demo.json", "teacher cnn1d {} 100 – {} {} {}",
            (J(r + "teacher.accuracy", 100), J(r + "teacher.ece", 100), J(r + "teacher.params"),
             J(r + "teacher.latency_ms"))),
        Fig(doc, "demo.json", "baseline (no teacher) mlp {} ± {} {} ± {} {} {} {} {}",
            (J(r + "baseline.accuracy", 100), J(r + "baseline.accuracy_std", 100), J(r + "baseline.agreement", 100),
             J(r + "baseline.agreement_std", 100), J(r + "baseline.kl_to_teacher"), J(r + "baseline.ece", 100),
             J(r + "baseline.params"), J(r + "baseline.latency_ms"))),
        Fig(doc, "demo.json", "distilled mlp {} ± {} {} ± {} {} {} {} {}",
            (J(r + "student.accuracy", 100), J(r + "student.accuracy_std", 100), J(r + "student.agreement", 100),
             J(r + "student.agreement_std", 100), J(r + "student.kl_to_teacher"), J(r + "student.ece", 100),
             J(r + "student.params"), J(r + "student.latency_ms"))),
        Fig(doc, "demo.json", "distillation helped: +{} points over the student trained alone, beyond the spread ({}) over {} seeds",
            (F(lambda d: 100 * (d["results"]["student"]["accuracy"] - d["results"]["baseline"]["accuracy"]), "gain"),
             F(lambda d: 100 * max(d["results"]["student"]["accuracy_std"], d["results"]["baseline"]["accuracy_std"]),
               "spread"),
             F(lambda d: len(d["results"]["seeds"]), "len(seeds)"))),
    ]


def _gain(d: dict) -> float:
    return 100 * (d["results"]["student"]["accuracy"] - d["results"]["baseline"]["accuracy"])


def _ladder_rows(doc: str, name: str, latency: bool) -> list[Fig]:
    out = []
    for i, width in enumerate((2, 4, 8, 16, 32)):
        rung = f"rungs[{i}]."
        bold = "**" if width == 32 else ""
        snippet = f"| width {width} | {{}} |" + (" {} |" if latency else "") + f" {{}} ± {{}} | {{}} ± {{}} | {bold}{{}} ± {{}}{bold} |"
        values = [J(rung + "params"), *([J(rung + "latency_ms")] if latency else []),
                  J(rung + "alone", 100), J(rung + "alone_std", 100), J(rung + "distilled", 100),
                  J(rung + "distilled_std", 100), J(rung + "gain", 100), J(rung + "gain_std", 100)]
        out.append(Fig(doc, name, snippet, tuple(values)))
    return out


def _methods(d: dict, name: str) -> dict:
    return next(m for m in d["methods"] if m["method"] == name)


def _trl(run: str) -> Callable[[dict], float]:
    return F(lambda d: d["throughput"]["runs"][run]["tokens_per_second_median"], f"tokens/s of {run}")


def _ratio(key: str) -> Callable[[dict], float]:
    return F(lambda d: d["throughput"]["ratios_of_medians"][key]["ratio_of_medians"], f"ratio {key}")


def _align(d: dict) -> float:
    return max(v["max_abs_diff_all"] for k, v in d["throughput"]["alignment_vs_trl_lambda0"].items()
               if k.startswith("distill"))


def _dev_kept(row: str) -> Callable[[dict], float]:
    return F(lambda d: 100 * d["rows"][row]["history"][-1]["dev_spearman"] / d["rows"]["teacher"]["dev_spearman"],
             f"{row}: last dev Spearman / the teacher's")


FIGURES: list[Fig] = [
    # ---------------------------------------------------------------- README.md: the demo
    *_demo_output("README.md"),
    *_demo_rows("README.md"),
    Fig("README.md", "demo.json", "`python benchmarks/run_recipe.py demo --out benchmarks/results/demo.json` "
        "([demo.json](benchmarks/results/demo.json)), {} s wall. Distillation helped by +{} points, {}× the spread over seeds; "
        "the student runs {}× faster than the teacher per sample.",
        (J("wall_seconds"), F(_gain, "gain"),
         F(lambda d: _gain(d) / (100 * d["results"]["student"]["accuracy_std"]), "gain / std"),
         F(lambda d: d["results"]["teacher"]["latency_ms"] / d["results"]["student"]["latency_ms"], "latency ratio"))),
    # ---------------------------------------------------------------- README.md: the mnist preset
    Fig("README.md", "mnist.json", "| **mnist** preset of 2026-11-25 (8-epoch schedules, {} seeds) teacher | hinton-teacher 1200-1200 | {} | {} | 100 | {} |",
        (F(lambda d: len(d["results"]["seeds"]), "len(seeds)"), J("results.teacher.params"),
         J("results.teacher.accuracy", 100), J("results.teacher.latency_ms"))),
    Fig("README.md", "mnist.json", "| student alone | hinton-student 800-800 | {} | {} ± {} | {} | {} |",
        (J("results.baseline.params"), J("results.baseline.accuracy", 100), J("results.baseline.accuracy_std", 100),
         J("results.baseline.agreement", 100), J("results.baseline.latency_ms"))),
    Fig("README.md", "mnist.json", "| distilled (KD, α 0.9, T 4) | hinton-student 800-800 | {} | {} ± {} | {} | {} |",
        (J("results.student.params"), J("results.student.accuracy", 100), J("results.student.accuracy_std", 100),
         J("results.student.agreement", 100), J("results.student.latency_ms"))),
    Fig("README.md", "mnist.json", "([mnist.json](benchmarks/results/mnist.json)), {} s wall.", (J("wall_seconds"),)),
    Fig("README.md", "mnist.json", "the dropout-regularised teacher ({}%) is *worse* than the student trained alone ({}%), "
        "and the distilled student copies it faithfully ({}% agreement)",
        (J("results.teacher.accuracy", 100), J("results.baseline.accuracy", 100), J("results.student.agreement", 100))),
    # ---------------------------------------------------------------- README.md: more results
    Fig("README.md", "methods.json", "| [methods](docs/methods.md) (Fashion-MNIST, {} methods, {} seeds) | student alone {} ± {}%; "
        "DIST {} ± {} best; KD {};",
        (F(lambda d: len(d["methods"]), "len(methods)"), F(lambda d: len(d["settings"]["seeds"]), "len(seeds)"),
         J("baseline.accuracy", 100), J("baseline.accuracy_std", 100),
         F(lambda d: 100 * _methods(d, "DIST")["accuracy"], "DIST"), F(lambda d: 100 * _methods(d, "DIST")["accuracy_std"], "DIST std"),
         F(lambda d: 100 * _methods(d, "KD")["accuracy"], "KD"))),
    Fig("README.md", "ranking.json", "HR@10: teacher {}, student alone (bce) {}, `ranknet_kd` {} |",
        (J("teacher.hr10"), J("rows[0].mean.hr10"), J("rows[3].mean.hr10"))),
    Fig("README.md", "detection.json", "(MNIST canvases, CenterNet {}k → {}k;",
        (J("summary[0].params", 1e-3), J("summary[1].params", 1e-3))),
    Fig("README.md", "detection.json", "mAP: teacher {}, student alone {} ± {}, box KD {} ± {} |",
        (J("summary[0].map", 100), J("summary[1].map", 100), J("summary[1].map_std", 100),
         J("summary[4].map", 100), J("summary[4].map_std", 100))),
    Fig("README.md", "hinton_mnist.json", "test errors of {};", (J("paper.test_set"),)),
    Fig("README.md", "hinton_mnist.json", "| teacher {} (paper {}); student alone without jitter {} ± {} (paper {}); "
        "distilled at T {} {} ± {} (paper {}), at T {} {} ({} seed).",
        (J("rows[0].errors_mean"), J("paper.teacher"), J("rows[3].errors_mean"), J("rows[3].errors_std"),
         J("paper.student_alone"), J("rows[2].temperature"), J("rows[2].errors_mean"), J("rows[2].errors_std"),
         J("paper.distilled"), J("rows[4].temperature"), J("rows[4].errors_mean"), F(lambda d: len(d["rows"][4]["seeds"]), "seeds"))),
    Fig("README.md", "hinton_mnist.json", "the teacher's schedule fits 2 CPU cores ({} epochs)", (J("settings.teacher.train.epochs"),)),
    Fig("README.md", "hinton_mnist_shipped.json", "| teacher {} errors ({} CPU hours); 800-800 without jitter, {} epochs, {} seeds: "
        "alone {} ± {} (paper {}), distilled with the pilot's choice (T {}) {} ± {} (target ≤ {}: missed), {} CPU minutes per student |",
        (J("teacher.test_errors"), J("teacher.cpu_hours"), J("settings.student_train.epochs"),
         F(lambda d: len(d["rows"][2]["seeds"]), "seeds"), J("rows[1].errors_mean"), J("rows[1].errors_std"),
         J("paper.student_alone"), J("rows[2].temperature"), J("rows[2].errors_mean"), J("rows[2].errors_std"),
         J("targets.distilled_errors_max"), J("summary.student_train_cpu_minutes"))),
    Fig("README.md", "sst2.json", "(MiniLM-L6 → BiLSTM, {}k sentences;", (J("settings.train_size", 1e-3),)),
    Fig("README.md", "sst2.json", "dev acc: teacher {}, BiLSTM alone {}, distilled {} |",
        (J("rows.teacher.dev_accuracy"), J("rows.bilstm_alone.dev_accuracy"), J("rows.bilstm_distilled.dev_accuracy"))),
    Fig("README.md", "stsb.json", "Spearman: teacher {}, static table {} ({}× faster), first layer {} ({}×), Model2Vec {} |",
        (J("rows.teacher.spearman"), J("rows.static.spearman"), J("rows.static.speedup"), J("rows.transformer.spearman"),
         J("rows.transformer.speedup"), J("rows.model2vec.spearman"))),
    Fig("README.md", "trl_parity.json", "loss within {} over {} settings; same loss curve over {} steps ({}); "
        "tokens/s {}× TRL's off-policy, {}× on-policy (λ {})",
        (J("parity.summary.max_abs_diff"), J("parity.summary.settings"), J("throughput.steps"), F(_align, "max |loss diff|"),
         _ratio("distill Trainer / TRL (lambda=0)"), _ratio("distill Trainer / TRL (lambda=0.5)"),
         J("settings.beta"))),
    Fig("README.md", "lm_distill.json", "(char GPT {}k → {}k;", (J("rows[0].params", 1e-3), J("rows[1].params", 1e-3))),
    Fig("README.md", "lm_distill.json", "val perplexity: teacher {}, alone {}, forward KL {} |",
        (J("rows[0].perplexity"), J("rows[1].perplexity"), J("rows[2].perplexity"))),
    Fig("README.md", "profile-cifar.json", "resnet32x4 / resnet8x4: {}× params, {}× eager and {}× ONNX Runtime latency at batch 1;",
        (J("speedup_vs_first.resnet8x4.params"), J("speedup_vs_first.resnet8x4.eager_b1"),
         J("speedup_vs_first.resnet8x4.onnxruntime_b1"))),
    Fig("README.md", "profile-mnist.json", "Hinton 1200-1200 / 800-800: {}× |", (J("speedup_vs_first.hinton-student.eager_b1"),)),
    Fig("README.md", "sweep.json", "sweep: default recipe {} ± {}%, the best settings on the same student {} ± {}%;",
        (J("comparison.default.score", 100), J("comparison.default.score_std", 100),
         J("comparison.best_settings.score", 100), J("comparison.best_settings.score_std", 100))),
    Fig("README.md", "ladder.json", "ladder: the gain grows with the student, −{} points at width {} to +{} ± {} at width {} |",
        (J("rungs[0].gain", -100), J("rungs[0].kwargs.width"), J("rungs[4].gain", 100), J("rungs[4].gain_std", 100),
         J("rungs[4].kwargs.width"))),
    Fig("README.md", "speed.json", "an epoch distilled from the cache costs {}× the student alone, {}× less than running the teacher every step",
        (J("pairs.fashion-cnn.ratio_cached_vs_student_alone"), J("pairs.fashion-cnn.speedup_cached_vs_hand_loop"))),
    # ---------------------------------------------------------------- docs/results.md
    *_demo_output("docs/results.md"),
    # ---------------------------------------------------------------- docs/losses.md
    Fig("docs/methods.md", "methods.json", "Spearman's rank correlation with Table 1 over the {} entries both have",
        (J("crd_table1.entries"),)),
    Fig("docs/methods.md", "methods.json", "included): ρ = {} (`python benchmarks/methods.py --rank-correlation-only`",
        (J("crd_table1.spearman"),)),
    Fig("docs/losses.md", "methods.json", "(Fashion-MNIST, `cnn` width 32 teacher {}%, `cnn` width 8 student with {}x fewer "
        "parameters, {} images, {} epochs, {} seeds)",
        (J("teacher.accuracy", 100), F(lambda d: d["teacher"]["params"] / d["baseline"]["params"], "params ratio"),
         J("settings.train_subset"), J("settings.epochs"), F(lambda d: len(d["settings"]["seeds"]), "len(seeds)"))),
    Fig("docs/losses.md", "methods.json", "nothing beat the student trained alone ({} ± {}%) beyond the seed spread; DIST ({} ± {}), "
        "CC, PKT, ReviewKD and VID matched it, plain KD lost {} points and AT with the CIFAR-tuned β lost {}.",
        (J("baseline.accuracy", 100), J("baseline.accuracy_std", 100),
         F(lambda d: 100 * _methods(d, "DIST")["accuracy"], "DIST"), F(lambda d: 100 * _methods(d, "DIST")["accuracy_std"], "DIST std"),
         J("baseline.vs_kd_points"),
         F(lambda d: 100 * (d["baseline"]["accuracy"] - _methods(d, "AT")["accuracy"]), "alone - AT"))),
    # ---------------------------------------------------------------- docs/cache.md
    Fig("docs/cache.md", "speed.json", "median epoch time of {} samples, batch {}, Adam, T {}, α {},",
        (J("settings.samples_per_epoch"), J("settings.batch_size"), J("settings.temperature"), J("settings.alpha"))),
    *[Fig("docs/cache.md", "speed.json", f"| {label} | {{}} s | {{}} s | {{}} s | {{}} s | **{{}}** | **{{}}** | {{}} s |",
          (J(f"pairs.{pair}.epoch_seconds_median.a_hand_loop_with_teacher"), J(f"pairs.{pair}.epoch_seconds_median.b_student_alone"),
           J(f"pairs.{pair}.epoch_seconds_median.c_distill_online"), J(f"pairs.{pair}.epoch_seconds_median.d_distill_cached"),
           J(f"pairs.{pair}.ratio_online_vs_hand_loop"), J(f"pairs.{pair}.ratio_cached_vs_student_alone"),
           J(f"pairs.{pair}.cache_build_seconds")))
      for pair, label in (("mnist-mlp", "MNIST MLP 1200-1200 → 800-800"), ("fashion-cnn", "Fashion-MNIST CNN-64 → CNN-8"))],
    Fig("docs/cache.md", "speed.json", "distilling the CNN student costs {}× less per epoch",
        (J("pairs.fashion-cnn.speedup_cached_vs_hand_loop"),)),
    # ---------------------------------------------------------------- docs/tuning.md: sweep
    Fig("docs/tuning.md", "sweep.json", "2 workers × 1 thread, 2026-11-25, {} min): Fashion-MNIST, {} training images of which {} "
        "are the validation split",
        (J("wall_seconds", 1 / 60), J("settings.train_subset"),
         F(lambda d: d["settings"]["train_subset"] * d["settings"]["val_fraction"], "validation images"))),
    Fig("docs/tuning.md", "sweep.json", "{} epochs, {} trials ({} pruned). Test accuracy over {} seeds:",
        (J("settings.epochs"), J("settings.trials"), F(lambda d: sum(t.get("state") == "PRUNED" for t in d["trials"]), "pruned"),
         F(lambda d: len(d["comparison"]["seeds"]), "len(seeds)"))),
    Fig("docs/tuning.md", "sweep.json", "| default (KD weight 0.9, T 4, lr 0.002) | width 8, depth 2 | {} | {} ± {} |",
        (J("comparison.default.params"), J("comparison.default.score", 100), J("comparison.default.score_std", 100))),
    Fig("docs/tuning.md", "sweep.json", "| best trial's settings (KD weight {} against cross-entropy 0.1, T {}, lr {}), default student "
        "| width 8, depth 2 | {} | **{} ± {}** (+{} points) |",
        (F(lambda d: d["best"]["params"]["distill.terms.1.weight"], "best KD weight"),
         F(lambda d: d["best"]["params"]["distill.terms.1.params.temperature"], "best T"),
         F(lambda d: d["best"]["params"]["train.lr"], "best lr"),
         J("comparison.best_settings.params"), J("comparison.best_settings.score", 100),
         J("comparison.best_settings.score_std", 100), J("comparison.gain_points_same_student"))),
    Fig("docs/tuning.md", "sweep.json", "| best trial | width {}, depth {} | {} | **{} ± {}** (+{} points) |",
        (F(lambda d: d["best"]["params"]["student.kwargs.width"], "width"),
         F(lambda d: d["best"]["params"]["student.kwargs.depth"], "depth"),
         J("comparison.best.params"), J("comparison.best.score", 100), J("comparison.best.score_std", 100),
         J("comparison.gain_points"))),
    Fig("docs/tuning.md", "sweep.json", "the search's settings are worth {} points", (J("comparison.gain_points_same_student"),)),
    Fig("docs/tuning.md", "sweep.json", "the bigger student it also found adds {} more",
        (F(lambda d: d["comparison"]["gain_points"] - d["comparison"]["gain_points_same_student"], "gain - same-student gain"),)),
    Fig("docs/tuning.md", "sweep.json", "fANOVA puts the student's depth ({}) and width ({}) first, then the learning rate ({}); "
        "temperature ({}) and KD weight ({}) matter little",
        tuple(F(lambda d, k=k: d["importances"][k], f"importance of {k}") for k in
              ("student.kwargs.depth", "student.kwargs.width", "train.lr", "distill.terms.1.params.temperature",
               "distill.terms.1.weight"))),
    Fig("docs/tuning.md", "sweep.json", "a `cnn` width-{} teacher, the preset's `cnn` width-{} depth-{} student with KD (α {}, T {}, "
        "lr {}), {} epochs, {} trials",
        (J("recipe.teacher.kwargs.width"), J("recipe.student.kwargs.width"), J("recipe.student.kwargs.depth"),
         J("recipe.distill.terms[1].weight"), J("recipe.distill.terms[1].params.temperature"), J("recipe.train.lr"),
         J("recipe.train.epochs"), J("settings.trials"))),
    # ---------------------------------------------------------------- docs/tuning.md: ladder
    Fig("docs/tuning.md", "ladder.json", "same machine, 2 workers × 1 thread, {} min): Fashion-MNIST, {} training images, a `cnn` "
        "width-32 depth-3 teacher ({}k params, {}% test), `cnn` depth-2 students of width 2 to 32, {} epochs, {} seeds",
        (J("wall_seconds", 1 / 60), J("recipe.data.train_subset"), J("teacher.params", 1e-3), J("teacher.score", 100),
         J("recipe.train.epochs"), F(lambda d: len(d["recipe"]["seeds"]), "len(seeds)"))),
    Fig("docs/tuning.md", "ladder.json", "(KD weight {} against cross-entropy {}, T {}, lr {}):",
        (J("recipe.distill.terms[1].weight"), J("recipe.distill.terms[0].weight"),
         J("recipe.distill.terms[1].params.temperature"), J("recipe.train.lr"))),
    *_ladder_rows("docs/tuning.md", "ladder.json", latency=True),
    Fig("docs/tuning.md", "ladder.json", "the advice proposes a width-{} assistant between the width-{} teacher and the width-{} student",
        (J("finding.assistant.kwargs.width"), J("teacher.kwargs.width"), J("rungs[0].kwargs.width"))),
    Fig("docs/tuning.md", "ladder-long.json", "--plot ladder-long.png`, {} min, teacher {}%)",
        (J("wall_seconds", 1 / 60), J("teacher.score", 100))),
    *_ladder_rows("docs/tuning.md", "ladder-long.json", latency=False),
    Fig("docs/tuning.md", "ladder-preset-kd.json", "distilling cost {} to {} points at every size",
        (F(lambda d: -100 * max(r["gain"] for r in d["rungs"]), "least loss"),
         F(lambda d: -100 * min(r["gain"] for r in d["rungs"]), "largest loss"))),
    # ---------------------------------------------------------------- docs/ranking.md
    Fig("docs/ranking.md", "ranking.json", "| teacher (sampled softmax, 50 neg) | {} | {} | {} |",
        (J("teacher.params"), J("teacher.hr10"), J("teacher.ndcg10"))),
    *[Fig("docs/ranking.md", "ranking.json", f"| {name} | {{}} | {bold}{{}} ± {{}}{bold} | {bold}{{}} ± {{}}{bold} |",
          (J(f"rows[{i}].params"), J(f"rows[{i}].mean.hr10"), J(f"rows[{i}].std.hr10"),
           J(f"rows[{i}].mean.ndcg10"), J(f"rows[{i}].std.ndcg10")))
      for i, name, bold in ((0, "student alone (bce)", ""), (1, "student alone (sampled softmax, 50 neg)", ""),
                            (2, "distilled: pointwise_kd (T 1)", ""), (3, "distilled: ranknet_kd (T 1)", "**"),
                            (4, "distilled: listnet_kd (T 3)", ""), (5, "distilled: rd (K 10, λ 1, μ 0.1, α 0.05)", ""))],
    Fig("docs/ranking.md", "ranking.json", "students MF dim 8 ({}× fewer parameters), {} epochs, mean ± std over {} seeds",
        (F(lambda d: d["teacher"]["params"] / d["rows"][0]["params"], "params ratio"), J("student_epochs"),
         F(lambda d: len(d["seeds"]), "len(seeds)"))),
    # ---------------------------------------------------------------- docs/detection.md
    Fig("docs/detection.md", "detection.json", "real MNIST digits pasted at {}-{} px on {}×{} canvases ({}-{} per canvas,",
        (J("config.scale[0]"), J("config.scale[1]"), J("config.canvas_size"), J("config.canvas_size"),
         J("config.digits[0]"), J("config.digits[1]"))),
    Fig("docs/detection.md", "detection.json", "{} train / {} test canvases, {} seeds;",
        (J("config.train_images"), J("config.test_images"), F(lambda d: len(d["config"]["seeds"]), "len(seeds)"))),
    Fig("docs/detection.md", "detection.json", "| teacher centernet-teacher | {} | {} | {} | {} |",
        (J("summary[0].params"), J("summary[0].map", 100), J("summary[0].map50", 100), J("summary[0].latency_ms"))),
    *[Fig("docs/detection.md", "detection.json", f"| {label} | {{}} | {bold}{{}} ± {{}}{bold} | {{}} ± {{}} | {{}} |",
          (J(f"summary[{i}].params"), J(f"summary[{i}].map", 100), J(f"summary[{i}].map_std", 100),
           J(f"summary[{i}].map50", 100), J(f"summary[{i}].map50_std", 100), J(f"summary[{i}].latency_ms")))
      for i, label, bold in ((1, "student alone centernet-student", ""), (2, "+ `heatmap_kd`", ""), (3, "+ `fg_feature`", ""),
                             (4, "+ `box_kd`", "**"), (5, "+ all three", ""))],
    Fig("docs/detection.md", "detection.json", "Only box-regression distillation helped here (+{} mAP,",
        (F(lambda d: 100 * (d["summary"][4]["map"] - d["summary"][1]["map"]), "box KD - alone"),)),
    Fig("docs/detection.md", "detection.json", "in this short schedule ({} epochs)", (J("config.epochs"),)),
    # ---------------------------------------------------------------- docs/text-and-embeddings.md: SST-2
    Fig("docs/text-and-embeddings.md", "sst2.json", "Measured by `python benchmarks/sst2.py --threads 1 --train-size {}`",
        (J("settings.train_size"),)),
    Fig("docs/text-and-embeddings.md", "sst2.json", "1 torch thread, 2026-11-25, {} min wall)", (J("wall_seconds", 1 / 60),)),
    Fig("docs/text-and-embeddings.md", "sst2.json", "fine-tuned for one epoch on {} random SST-2 training sentences; every student "
        "trains {} epochs on the same sentences; accuracy on the GLUE dev set ({}).",
        (J("settings.train_size"), J("settings.student_epochs"), J("data.dev_sentences"))),
    *[Fig("docs/text-and-embeddings.md", "sst2.json", f"| {label} | {{}} M ({{}} M) | {bold}{{}}{bold} | {{}} | {{}} |",
          (J(f"rows.{key}.params", 1e-6), J(f"rows.{key}.params_without_embeddings", 1e-6), J(f"rows.{key}.dev_accuracy"),
           J(f"rows.{key}.agreement_with_teacher"), J(f"rows.{key}.latency_ms")))
      for key, label, bold in (("teacher", "teacher: MiniLM-L6 (6 × 384)", ""), ("bert2_alone", "2-layer BERT-192 alone", ""),
                               ("bert2_distilled", "2-layer BERT-192 distilled: TinyBERT layer map (hidden states, attentions, "
                                "embeddings) + KD", ""),
                               ("bilstm_alone", "BiLSTM (own word vocabulary) alone", ""),
                               ("bilstm_distilled", "BiLSTM distilled: 0.5 CE + 0.5 logit MSE (Tang et al. 2019)", "**"))],
    Fig("docs/text-and-embeddings.md", "sst2.json", "in this one-stage, {}-epoch, no-augmentation setting",
        (J("settings.student_epochs"),)),
    Fig("docs/text-and-embeddings.md", "sst2.json", "Distillation helped the BiLSTM by +{} points; for the 2-layer BERT it raised "
        "agreement with the teacher by {} points but not accuracy (−{})",
        (F(lambda d: d["rows"]["bilstm_distilled"]["dev_accuracy"] - d["rows"]["bilstm_alone"]["dev_accuracy"], "BiLSTM gain"),
         F(lambda d: d["rows"]["bert2_distilled"]["agreement_with_teacher"] - d["rows"]["bert2_alone"]["agreement_with_teacher"],
           "BERT agreement gain"),
         F(lambda d: d["rows"]["bert2_alone"]["dev_accuracy"] - d["rows"]["bert2_distilled"]["dev_accuracy"], "BERT loss"))),
    # ---------------------------------------------------------------- docs/text-and-embeddings.md: STS-B
    Fig("docs/text-and-embeddings.md", "stsb.json", "1 torch thread, 2026-12-02, {} s including {} s to embed the teacher's corpus",
        (J("wall_seconds"), J("teacher_table_seconds"))),
    Fig("docs/text-and-embeddings.md", "stsb.json", "Students train on {} unlabelled sentences", (J("settings.corpus_sentences"),)),
    *[Fig("docs/text-and-embeddings.md", "stsb.json", f"| {label} | {{}} M | {bold}{{}}{bold} | {{}}% | {{}} | {{}}× |",
          (J(f"rows.{key}.params", 1e-6), J(f"rows.{key}.spearman"), J(f"rows.{key}.kept_%"), J(f"rows.{key}.sentences_per_s"),
           J(f"rows.{key}.speedup")))
      for key, label, bold in (("teacher", "teacher: all-MiniLM-L6-v2 (6 layers × 384)", ""),
                               ("transformer", "the teacher's first layer, distilled", ""),
                               ("static", "static table (30,522 × 384), distilled", "**"),
                               ("model2vec", "Model2Vec 0.10 `distill` (PCA 256)", ""))],
    Fig("docs/text-and-embeddings.md", "stsb.json", "The distilled static table beats Model2Vec's by {} points at {}× the teacher's speed.",
        (F(lambda d: d["rows"]["static"]["spearman"] - d["rows"]["model2vec"]["spearman"], "static - Model2Vec"),
         J("rows.static.speedup"))),
    Fig("docs/text-and-embeddings.md", "stsb.json", "**not met**: {}% is the best. On STS-B dev both students keep more ({}% and {}%).",
        (J("rows.static.kept_%"), _dev_kept("static"), _dev_kept("transformer"))),
    # ---------------------------------------------------------------- docs/language-models.md
    Fig("docs/language-models.md", "lm_distill.json", "{} s of CPU on 1 torch thread", (J("cpu_seconds"),)),
    Fig("docs/language-models.md", "lm_distill.json", "a 4-layer × 128 GPT teacher ({}k parameters, {} steps, held-out perplexity {} "
        "per character) and 2-layer × 64 students ({}k parameters, {} steps each,",
        (J("rows[0].params", 1e-3), J("rows[0].steps"), J("rows[0].perplexity"), J("rows[1].params", 1e-3), J("rows[1].steps"))),
    Fig("docs/language-models.md", "lm_distill.json", "the teacher's NLL of {} characters each model writes after {} held-out prompts "
        "(nats per character; the teacher's own: {}).",
        (J("config.sample_new"), J("config.sample_prompts"), J("rows[0].sample_teacher_nll"))),
    *[Fig("docs/language-models.md", "lm_distill.json", f"| {label} | {cells} |",
          (J(f"rows[{i}].perplexity"), J(f"rows[{i}].agreement", 100), J(f"rows[{i}].kl_to_teacher"),
           J(f"rows[{i}].sample_teacher_nll")))
      for i, label, cells in ((1, "alone (cross-entropy)", "{} | {} | {} | {}"), (2, "forward KL", "**{}** | **{}** | **{}** | {}"),
                              (3, "reverse KL", "{} | {} | {} | {}"), (4, "JSD β = 0.5", "{} | {} | {} | **{}**"),
                              (5, "TVD", "{} | {} | {} | {}"), (6, "skew KL α = 0.1", "{} | {} | {} | {}"),
                              (7, "on-policy JSD β = 0.5, λ = 0.5", "{} | {} | {} | {}"),
                              (8, "sequence-level KD (teacher's samples)", "{} | {} | {} | {}"))],
    Fig("docs/language-models.md", "lm_distill.json", "half of a {}-step budget goes to its own gibberish", (J("rows[7].steps"),)),
    Fig("README.md", "lm_scale.json",
        "fused head + loss: peak memory {}× the logits path at vocab 50,257 and {}× at 151,936, time {}× and {}×; "
        "top-64 token cache: {} bytes per token, a training step {}× the student alone (the live teacher {}×; "
        "target 1.10×: met), perplexity {} against {} from the live teacher",
        (J("fused.summary.vocab 50257, 1024 tokens.peak_mem_ratio"), J("fused.summary.vocab 151936, 1024 tokens.peak_mem_ratio"), J("fused.summary.vocab 50257, 1024 tokens.time_ratio"), J("fused.summary.vocab 151936, 1024 tokens.time_ratio"),
         J("cache.summary.cache.bytes_per_token"), J("cache_steps.summary.steps.cached_vs_alone"),
         J("cache_steps.summary.steps.live_vs_alone"), J("cache.summary.cache.ppl_cached"),
         J("cache.summary.cache.ppl_live"))),
    Fig("docs/language-models.md", "lm_scale.json",
        "(a step {}× the student alone against {}× with the live teacher, measured interleaved;",
        (J("cache_steps.summary.steps.cached_vs_alone"), J("cache_steps.summary.steps.live_vs_alone"))),
    Fig("docs/language-models.md", "lm_scale.json", "and now takes {}× (`cache_steps`' \"loss only\" rows;",
        (F(lambda d: d["cache_steps"]["rows"][4]["step s (median)"] / d["cache_steps"]["rows"][3]["step s (median)"],
           "fkl / ce loss time"),)),
    Fig("docs/language-models.md", "lm_scale.json", "on a machine busy with two other jobs: {}×, noisier)",
        (J("cache.summary.cache.cached_vs_alone"),)),
    Fig("docs/language-models.md", "lm_scale.json", "(4 epochs on 1,500 blocks, perplexity {})",
        (J("cache.summary.cache.ppl_teacher"),)),
    Fig("docs/language-models.md", "lm_scale.json", "its perplexity is {} against {} distilled from the live teacher",
        (J("cache.summary.cache.ppl_cached"), J("cache.summary.cache.ppl_live"))),
    Fig("README.md", "lm_scale.json", "FSDP on 2 processes = 1 process within {} |",
        (J("fsdp.summary.fsdp.max_abs_weight_difference"),)),
    Fig("docs/language-models.md", "lm_scale.json",
        "jobs: peak memory {}× today's path (the heads' products, full logits, `token_gjsd`) at vocab 50,257 and {}× "
        "at 151,936, and {}× at 4,096 tokens; time {}× and {}×; against GKD's loss as TRL writes it (plain autograd "
        "over full logits) {}× and {}× the memory, {}× and {}× the time.",
        (J("fused.summary.vocab 50257, 1024 tokens.peak_mem_ratio"), J("fused.summary.vocab 151936, 1024 tokens.peak_mem_ratio"), J("fused.summary.vocab 50257, 4096 tokens.peak_mem_ratio"), J("fused.summary.vocab 50257, 1024 tokens.time_ratio"), J("fused.summary.vocab 151936, 1024 tokens.time_ratio"),
         J("fused.summary.vocab 50257, 1024 tokens.peak_mem_ratio_vs_trl"), J("fused.summary.vocab 151936, 1024 tokens.peak_mem_ratio_vs_trl"), J("fused.summary.vocab 50257, 1024 tokens.time_ratio_vs_trl"),
         J("fused.summary.vocab 151936, 1024 tokens.time_ratio_vs_trl"))),
    Fig("docs/language-models.md", "lm_scale.json",
        "`fused_head` takes {}× the peak memory ({} MiB against {} MiB) and {}× the time; from the top-64 cache, {}× "
        "the memory ({} MiB against {} MiB) and {}× the time.",
        (J("fused_recipe.summary.live.peak_mem_ratio"), J("fused_recipe.rows[1].peak memory MiB"),
         J("fused_recipe.rows[0].peak memory MiB"), J("fused_recipe.summary.live.time_ratio"),
         J("fused_recipe.summary.cached.peak_mem_ratio"), J("fused_recipe.rows[3].peak memory MiB"),
         J("fused_recipe.rows[2].peak memory MiB"), J("fused_recipe.summary.cached.time_ratio"))),
    Fig("README.md", "schedule_curve.json",
        "the stronger student alone is {} points at 15 epochs, +{} at 30, +{} at 60 and +{} at 120 (gap closed {}), while the "
        "student alone, even given the same steps, gains {} points from 60 to 120.",
        (J("rows.mnist1d-cnn32.points[0].gain_points"), J("rows.mnist1d-cnn32.points[1].gain_points"),
         J("rows.mnist1d-cnn32.points[2].gain_points"), J("rows.mnist1d-cnn32.points[3].gain_points"),
         J("rows.mnist1d-cnn32.points[3].gap_closed"),
         F(lambda d: d["rows"]["mnist1d-cnn32"]["points"][3]["alone_same_steps"]["mean"]
           - d["rows"]["mnist1d-cnn32"]["points"][2]["alone_same_steps"]["mean"], "alone (same steps) 120 - 60"))),
    Fig("docs/recipes.md", "channels_last.json",
        "an epoch of the CIFAR-10 width-8 student {}× faster, the width-16 teacher's {}×, but the Fashion-MNIST width-4 student's {}×",
        tuple(F(lambda d, case=case: next(r["speedup"] for r in d["rows"] if r["case"] == case), f"speed-up of {case}")
              for case in ("cifar10 cnn16 -> cnn8", "cifar10 cnn16 alone (a teacher's training)", "fashion cnn16 -> cnn4"))),
    Fig("docs/language-models.md", "trl_parity.json", "[trl_parity.json](../benchmarks/results/trl_parity.json), {} s, 1 thread,",
        (J("wall_seconds"),)),
    Fig("docs/language-models.md", "trl_parity.json", "- Over {} settings (β 0 to 1, T 0.5 to 2, padding and prompt masks), the "
        "losses differ by at most {} and the gradients by {}.",
        (J("parity.summary.settings"), J("parity.summary.max_abs_diff"), J("parity.summary.max_grad_abs_diff"))),
    Fig("docs/language-models.md", "trl_parity.json", "the two loss curves stay within {} over {} steps.",
        (F(_align, "max |loss diff|"), J("throughput.steps"))),
    Fig("docs/language-models.md", "trl_parity.json", "batch {} × {}, one CPU thread, medians of {} interleaved repeats:",
        (J("settings.batch"), J("settings.block"), J("throughput.repeats"))),
    Fig("docs/language-models.md", "trl_parity.json", "off-policy: distill's `Trainer` runs at {} tokens/s and `DistillTrainer` at {}, "
        "against {} for `GKDTrainer` ({}×);",
        (_trl("distill Trainer + Distiller, token_gjsd"), _trl("distill DistillTrainer (HF Trainer), token_gjsd"),
         _trl("TRL GKDTrainer, lambda=0"), _ratio("distill Trainer / TRL (lambda=0)"))),
    Fig("docs/language-models.md", "trl_parity.json", "on-policy at λ = 0.5: {} against {} ({}×).",
        (_trl("distill Trainer + OnPolicyTransform, lambda=0.5"), _trl("TRL GKDTrainer, lambda=0.5"),
         _ratio("distill Trainer / TRL (lambda=0.5)"))),
    Fig("docs/language-models.md", "trl_parity.json", "TRL fails on padded vocabularies ({} vs {})",
        (J("parity.padded_vocab.student_width"), J("parity.padded_vocab.teacher_width"))),
]


@pytest.mark.parametrize("fig", FIGURES, ids=str)
def test_figure_matches_its_results_file(fig):
    numbers = find(fig)
    data = results(fig.results)
    for text, value in zip(numbers, fig.values):
        expected = value(data)
        assert agrees(text, expected), (
            f"{fig.doc} prints {text} where {fig.results} has {value.__name__} = {expected!r}: {fig.snippet!r}")


def test_the_figure_check_can_fail():
    assert agrees("66.47", 66.4700001) and agrees("3.8", 3.777) and agrees("4.4", 4.35) and agrees("28,298", 28298)
    assert agrees("1.9e-6", 1.907e-6) and agrees("−0.94", -0.94)
    assert not agrees("3.7", 3.777) and not agrees("66.48", 66.47) and not agrees("+0.94", -0.94)
    assert not agrees("2.1e-5", 2.2e-5)
    with pytest.raises(AssertionError, match="no longer says"):
        find(Fig("README.md", "demo.json", "a sentence the README does not hold: {}", (J("wall_seconds"),)))


# ------------------------------------------------------------------ docs/methods.md, row by row
def test_methods_page_matches_methods_json():
    data = results("methods.json")
    rows = []
    for line in (ROOT / "docs" / "methods.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and re.match(r"[\d.]+", cells[2]):
            acc, _, std = cells[2].partition(" ± ")
            rows.append(dict(zip(("method", "group", "acc", "agree", "pts", "units", "sec"), [*cells[:2], acc, *cells[3:]]),
                             std=std))
    by_name = {m["method"]: m for m in data["methods"]}
    assert {r["method"] for r in rows} == {"teacher", "student alone", *by_name}, "docs/methods.md lists other methods"
    for row in rows:
        if row["method"] == "teacher":
            expected = {"acc": 100 * data["teacher"]["accuracy"], "sec": data["teacher"]["seconds"]}
        else:
            m = data["baseline"] if row["method"] == "student alone" else by_name[row["method"]]
            expected = {"acc": 100 * m["accuracy"], "std": 100 * m["accuracy_std"], "agree": 100 * m["agreement"],
                        "pts": m["vs_kd_points"], "units": m["vs_kd_std_units"], "sec": m["seconds"]}
        for key, value in expected.items():
            assert row[key] and agrees(row[key], value), f"docs/methods.md, {row['method']}: {key} {row[key]!r} vs {value}"
    assert agrees(re.search(r"whole table ([\d.]+) min", (ROOT / "docs" / "methods.md").read_text()).group(1),
                  data["wall_seconds"] / 60)


# ------------------------------------------------------------------------------------ links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            lines.append(line.lstrip("#"))
    return {slug(h) for h in lines}


def links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # not in code blocks
    return [next(g for g in m.groups() if g) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{doc.name}: broken links: {broken}"


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n## A `b` c\n[ok](#a-b-c) [gone](nothing.md) [anchor](#nope)\n```\n[code](x.md)\n```\n")
    assert links(page) == ["#a-b-c", "nothing.md", "#nope"]
    assert anchors(page) == {"title", "a-b-c"}
    with pytest.raises(AssertionError, match="nothing.md"):
        test_relative_links_resolve(page)


# ------------------------------------------------------------------------- the test command
def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target (``$(BIN)/python`` read as ``python``)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(BIN)/", ""))
    return recipe


def readme_commands() -> list[str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def ci_commands() -> list[list[str]]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    assert readme_commands() == ["make demo", "make test"]
    make_calls = [c for c in ci_commands() if c[0] == "make"]
    assert len(make_calls) == 1, f".ci/run should run the README's test command once: {make_calls}"
    targets = [word for word in make_calls[0][1:] if "=" not in word]
    assert targets == ["test"], f".ci/run runs make {targets}, the README says make test"
    assert any(word.startswith("VENV=") for word in make_calls[0]), ".ci/run must install into a fresh venv"
    pytest_lines = [line for line in make_recipe("test") if "pytest" in line]
    assert pytest_lines == ["python -m pytest -n 2 tests"]
    assert pytest_lines[0] in (ROOT / "README.md").read_text(), "the README names another test command than make test runs"
    assert [line for line in make_recipe("test-fast") if "pytest" in line] == ["python -m pytest -n 2 -m fast tests"]


def test_fast_marker_is_registered(pytestconfig):
    markers = pytestconfig.getini("markers")  # [tool.pytest.ini_options] markers in pyproject.toml
    assert any(m.split(":")[0].strip() == "fast" for m in markers), markers


# ---------------------------------------------------------------------- the reference pages
def _yaml_block(after: str) -> str:
    return re.search(re.escape(after) + r".*?```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def test_readme_recipe_is_a_valid_recipe(tmp_path):
    from distill.recipes import load_recipe
    from distill.recipes.loader import validate_names

    path = tmp_path / "my.yaml"
    path.write_text(_yaml_block("Save as `my.yaml`"))
    recipe = load_recipe(path)
    validate_names(recipe)
    assert recipe.pilot is not None and recipe.pilot.enabled
    assert len(recipe.seeds) > 1 and recipe.teacher.train is not None


def test_demo_facts_the_readme_states():
    from distill.recipes import load_recipe

    demo = load_recipe("demo")
    readme = text_of("README.md")
    assert f"**{len(demo.seeds)} seeds**" in readme
    assert demo.data.name == "mnist1d" and f"{demo.data.train_subset:,} labelled training samples" in readme
    assert demo.teacher.weights is None and demo.teacher.model == "cnn1d", "the README says the demo trains a CNN teacher"
    assert demo.student.model == "mlp" and demo.distill.mixup_alpha, "the README says: an MLP student, function matching"
    assert "runs/demo-<timestamp>" in readme and "runs/demo-<timestamp>" in text_of("docs/cli.md")


def test_recipes_page_lists_every_preset_and_data_set():
    from distill.data import DATASETS
    from distill.recipes import preset_names
    from distill.tasks.base import all_tasks

    page = (ROOT / "docs" / "recipes.md").read_text()
    presets = page[page.index("\n## Presets"):page.index("\n## Data sets")]
    data_sets = page[page.index("\n## Data sets"):page.index("\n### Your arrays")]
    row = re.compile(r"^\| `([\w-]+)` \| ", re.M)
    assert set(row.findall(presets)) == set(preset_names())
    tasks = all_tasks()  # importing the tasks registers their data sets
    data_names = set(DATASETS.names()) | {d for task in tasks.values() for d in (task.data_names or ())}
    assert set(row.findall(data_sets)) == data_names


def test_recipes_page_names_every_recipe_field():
    from distill.recipes.schema import (AugmentSpec, BaselineSpec, DataSpec, EvaluateSpec, GateSpec, PilotSpec, Recipe,
                                        TeacherSpec, TermSpec)
    from distill.train_config import TrainConfig

    page = (ROOT / "docs" / "recipes.md").read_text()
    owned_by_run = {"seed", "progress"}
    missing = [f"{model.__name__}.{name}" for model in (Recipe, DataSpec, AugmentSpec, TeacherSpec, GateSpec, BaselineSpec,
                                                        TermSpec, PilotSpec, EvaluateSpec, TrainConfig)
               for name in model.model_fields if name not in owned_by_run and f"`{name}`" not in page]
    assert not missing, f"docs/recipes.md does not name {missing}"


def test_losses_page_lists_every_loss_with_its_parameters():
    from distill.losses import LOSSES, get_loss

    page = (ROOT / "docs" / "losses.md").read_text()
    for name in (n for n in LOSSES.names() if not n.startswith("_")):  # "_name": registered by a test
        row = re.search(rf"^\| `{re.escape(name)}` \| [^|]+ \| ([^|]+) \|$", page, re.M)
        assert row, f"docs/losses.md has no row for the loss {name}"
        assert set(re.findall(r"`(\w+)`", row.group(1))) == set(get_loss(name).param_names()), name


def test_cli_page_names_every_command_and_option():
    import argparse

    from distill.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, p in sub.choices.items():
        if f"## `distill {command}`" not in page:
            missing.append(f"the section of distill {command}")
        for action in p._actions:
            missing += [f"distill {command} {o}" for o in action.option_strings
                        if o.startswith("--") and o != "--help" and o not in page]
    missing += [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help" and o not in page]
    assert not missing, f"docs/cli.md does not name {missing}"


def test_stale_claims_stay_gone():
    readme, docs = text_of("README.md"), " ".join(text_of(str(p.relative_to(ROOT))) for p in DOCS)
    assert "over 3 seeds" not in readme  # the demo runs 5
    assert "shows parameters" not in docs and "prints them with their parameters" not in docs  # distill list: names only
    assert "TensorBoard logs" not in readme


def test_architecture_page_names_every_layered_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("layers_table", ROOT / "tests" / "test_layers.py")
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for layer in layers.LAYERS for m in layer if m and f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md does not name {missing} (tests/test_layers.py LAYERS)"


def test_development_page_names_the_fast_tier():
    marked = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                    if re.search(r"^pytestmark = .*pytest\.mark\.fast", p.read_text(), re.M))
    assert "test_docs.py" in marked and len(marked) > 5
    page = (ROOT / "docs" / "development.md").read_text()
    assert [name for name in marked if f"`{name}`" not in page] == []



def test_wins_rows_in_the_readme_match_wins_json():
    """Every row of benchmarks/results/wins.json is in the README's first results table, with the
    numbers of the file: the teacher, the student alone it was compared with, the distilled student,
    the gain and the share of the gap closed."""
    doc = results("wins.json")
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert doc["rows"]
    for r in doc["rows"]:
        line = next((entry for entry in lines if f"`{r['row']}`" in entry), None)
        assert line is not None, f"README has no line for wins row {r['row']}"
        alone, dist = r[r["compared_with"]], r["distilled"]
        expected = [f"{r['teacher_acc']:.2f}", f"{alone['mean']:.2f} ± {alone['std']:.2f}",
                    f"{dist['mean']:.2f} ± {dist['std']:.2f}", f"{r['gain_points']:+.2f}",
                    f"{r['gap_closed']:.2f}" if r["gap_closed"] is not None else "-",
                    "met" if r["target_met"] else "missed"]
        missing = [text for text in expected if text not in line]
        assert not missing, f"README's {r['row']} line lacks {missing}: {line}"
