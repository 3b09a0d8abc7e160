"""The ``distill`` command line.

    distill demo                      the whole pipeline on offline data, in under two minutes
    distill run RECIPE [--set k=v]    teacher → baseline → distilled student → report
    distill check RECIPE              one-batch dry run: taps, adapters, term values, gradients
    distill cache RECIPE --out DIR    run the teacher once, store its outputs for training
    distill report RUN_DIR            print the table of a finished run and rewrite report.md
    distill profile MODEL_OR_RUN      params, size, MACs, memory, latency (eager, ONNX Runtime)
    distill export RUN --format F     the student as onnx/torchscript/safetensors, parity-checked
    distill sweep RECIPE --trials N   Optuna search of temperature, weights, lr, student size
    distill ladder RECIPE             students of increasing size, alone and distilled (capacity gap)
    distill list                      models, losses, data sets and preset recipes

Errors in the user's input print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from distill.errors import DistillError

EXIT_USAGE = 2


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the results table
        console = Console(width=140)
    return console


def _print_results(console, results) -> None:
    from rich.table import Table

    from distill.report import header, table_rows
    from distill.run_result import RunResult

    results = RunResult.parse(results)
    table = Table(title=f"{results.recipe}: test set, mean ± std over seeds {results.seeds}")
    for column in header(results):
        table.add_column(column, justify="right" if column else "left")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold]{results.verdict}[/bold]")
    from distill.report import gate_lines

    for line in gate_lines(results):
        console.print(line, markup=False)


def _load(args) -> "Recipe":  # noqa: F821
    from distill.recipes import load_recipe

    overrides = list(args.set or [])
    if getattr(args, "pilot", False):
        overrides.append("pilot.enabled=true")
    if getattr(args, "retrain_teacher", False):
        overrides.append("teacher.weights=null")
    if getattr(args, "seeds", None):
        overrides.append(f"seeds=[{args.seeds}]")
    return load_recipe(args.recipe, overrides)


def _check_out_dir(out: str | None, *, run: bool = False) -> None:
    """Refuse an ``--out`` folder path that is (or lies under) an existing file, before any work."""
    if not out:
        return
    path = Path(out).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                what = f"--out {path}: {place}" if place != path else f"--out {path}"
                again = ", or an existing run directory with --resume or --overwrite" if run else ""
                raise DistillError(
                    f"{what} is a file, not a directory; --out names the folder to write into: give a new "
                    f"folder's path{again}"
                )
            return


def _run(args, recipe_source: str | None = None) -> int:
    from distill.pipeline import run_recipe

    _check_out_dir(args.out, run=True)
    console = _console()
    if recipe_source is not None:
        args.recipe = recipe_source
    recipe = _load(args)
    out = Path(args.out) if args.out else Path("runs") / (
        f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}" if args.command == "demo" else recipe.name
    )
    started = time.perf_counter()
    results = run_recipe(
        recipe, out, data_dir=args.data_dir, resume=getattr(args, "resume", False),
        overwrite=args.overwrite, progress=not args.quiet, console=console, source=str(args.recipe),
    )
    _print_results(console, results)
    console.print(f"run directory: {out}  ({time.perf_counter() - started:.0f} s); see {out / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    return _run(args, recipe_source="demo")


def cmd_run(args) -> int:
    return _run(args)


def cmd_check(args) -> int:
    from rich.table import Table

    from distill.check import check_recipe

    console = _console()
    recipe = _load(args)
    if args.suggest_taps:
        _print_tap_suggestions(console, recipe, args)
    report = check_recipe(recipe, args.data_dir)
    for name, result in report.stages.items():
        table = Table(title=f"{name}: taps on one batch")
        for column in ("model", "tap", "shape"):
            table.add_column(column)
        for model, taps in (("student", result.student_taps), ("teacher", result.teacher_taps)):
            for tap, shape in taps.items():
                table.add_row(model, tap, str(list(shape)))
        console.print(table)
        for term, desc in result.adapters.items():
            console.print(f"  adapter for '{term}': {desc}")
        for term, value in result.terms.items():
            console.print(f"  term '{term}' = {value:.6g}")
    if report.problems:
        raise DistillError("; ".join(report.problems))
    console.print("[green]check passed[/green]: every term is finite and trains the student")
    return 0


def _print_tap_suggestions(console, recipe, args) -> None:
    from rich.table import Table

    from distill.tap_suggest import suggest_for_recipe

    if args.top < 1:
        raise DistillError("--top must be at least 1")
    found = suggest_for_recipe(recipe, args.data_dir, top=args.top)
    table = Table(title="tap pairs: relative depth and linear CKA on one batch (chosen pairs marked *)")
    for column in ("", "student tap", "depth", "teacher tap", "depth", "CKA", "score", "student -> teacher shape"):
        table.add_column(column)
    chosen = {(p.student, p.teacher) for p in found.pairs}
    shown = found.candidates[: max(3 * args.top, 10)]
    shown += [p for p in found.pairs if p not in shown]
    for pair in shown:
        table.add_row("*" if (pair.student, pair.teacher) in chosen else "", pair.student, f"{pair.student_depth:.2f}",
                      pair.teacher, f"{pair.teacher_depth:.2f}", f"{pair.cka:.3f}", f"{pair.score:.3f}",
                      f"{list(pair.student_shape)} -> {list(pair.teacher_shape)}")
    console.print(table)
    for note in found.notes:
        console.print(f"note: {note}", markup=False)
    console.print(found.yaml_snippet(), markup=False, highlight=False)


def _source(args, text: str, weights: str | None = None):
    from distill.finished_run import parse_shape, resolve_source

    shape = parse_shape(args.input_shape) if args.input_shape else None
    return resolve_source(text, input_shape=shape, num_classes=args.classes, weights=weights,
                          data_dir=args.data_dir)


def cmd_profile(args) -> int:
    import json

    from rich.table import Table

    from distill.finished_run import FinishedRun
    from distill.profile import profile_report, profile_rows, profile_source

    weights = args.weights or []
    if weights and len(weights) != len(args.models):
        raise DistillError(f"give --weights once per model ({len(args.models)}), or not at all")
    sources = [_source(args, text, weights[i] if weights else None) for i, text in enumerate(args.models)]
    if any(isinstance(s, FinishedRun) for s in sources) and len(sources) > 1:
        raise DistillError("profile one run directory at a time (it holds both teacher and student)")
    options = dict(batch=args.batch, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                   device=args.device, onnx=False if args.no_onnx else None)
    profiles = [p for source in sources for p in profile_source(source, **options)]
    header, rows = profile_rows(profiles)
    first = profiles[0]
    table = Table(title=f"profile on {first.device}, {first.threads} thread(s), input {list(first.input_shape)}; "
                        f"latency over {args.repeats} runs")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = _console()
    console.print(table)
    for note in dict.fromkeys(n for p in profiles for n in p.notes):
        console.print(f"note: {note}", markup=False)
    if args.out:
        from distill.checkpoints import atomic_write

        text = json.dumps(profile_report(profiles), indent=2).encode()
        atomic_write(Path(args.out), lambda f: f.write(text))
        console.print(f"profile: {args.out}")
    return 0


def cmd_export(args) -> int:
    import json

    from distill.export import export_source

    source = _source(args, args.model_or_run, args.weights)
    result = export_source(source, args.format, args.out, quantize=args.quantize, tolerance=args.tolerance,
                           samples=args.samples, max_accuracy_drop=args.max_accuracy_drop)
    console = _console()
    p = result.parity
    console.print(f"exported {result.format}{' int8' if result.quantize else ''}: {result.path} "
                  f"({result.size_bytes / 2**20:.2f} MiB)", markup=False)
    console.print(f"parity against the {p.reference}: max |logit difference| {p.max_abs_diff:.3g} "
                  f"(allowed {p.allowed:.3g}), top-1 agreement {100 * p.agreement:.2f}% on {p.samples} samples",
                  markup=False)
    q = result.quantization
    if q is not None:
        console.print(f"int8 vs fp32: max |logit difference| {q.max_abs_diff:.3g}, top-1 agreement "
                      f"{100 * q.agreement:.2f}%", markup=False)
        if q.accuracy_fp32 is not None:
            console.print(f"test accuracy ({q.test_samples} samples): fp32 {100 * q.accuracy_fp32:.2f}%, "
                          f"int8 {100 * q.accuracy_int8:.2f}% ({0.0 - 100 * q.accuracy_drop:+.2f} points)", markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    if args.json:
        from distill.checkpoints import atomic_write

        text = json.dumps(result.to_dict(), indent=2).encode()
        atomic_write(Path(args.json), lambda f: f.write(text))
    return 0


def cmd_cache(args) -> int:
    from distill.stage import check_runnable, make_cache
    from distill.tasks.base import get_task

    _check_out_dir(args.out)
    console = _console()
    recipe = _load(args)
    if recipe.teacher.weights is None:
        raise DistillError(
            "distill cache needs a trained teacher: set teacher.weights (for example "
            "--set teacher.weights=runs/NAME/teacher.safetensors from a finished run)"
        )
    task = get_task(recipe.task)
    check_runnable(recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"cache": "auto"})}), task)
    started = time.perf_counter()
    prepared = task.prepare(recipe, args.data_dir)
    teacher = task.build_model(recipe.teacher, prepared, recipe.seeds[0])
    path = make_cache(recipe, task, teacher, prepared, args.out)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    console.print(
        f"teacher cache: {path} ({len(prepared.train)} samples x {recipe.data.views or 1} view(s), "
        f"{size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s); use it with "
        f"--set teacher.cache={path}"
    )
    return 0


def cmd_report(args) -> int:
    from distill.report import load_results, write_report

    results = load_results(args.run_dir)
    path = write_report(args.run_dir, results)
    console = _console()
    _print_results(console, results)
    console.print(f"report: {path}")
    return 0


def cmd_list(args) -> int:
    from distill.data import DATASETS
    from distill.losses import LOSSES
    from distill.models import MODELS
    from distill.recipes import preset_names
    from distill.tasks.base import all_tasks

    console = _console()
    tasks = all_tasks()  # importing the tasks registers their own data sets
    described = [f"{name} ({', '.join(task.data_names)})" if task.data_names else name for name, task in tasks.items()]
    from distill.models.weights import shipped_teachers

    teachers = [f"shipped:{name} ({m['model']}, {100 * next(v for k, v in m.items() if k.startswith('test_')):.2f}% on "
                f"{m['data']['name']})" for name, m in shipped_teachers().items()]
    for title, names in (("tasks", described), ("models", MODELS.names()), ("losses", LOSSES.names()),
                         ("data sets", DATASETS.names()), ("presets", preset_names()), ("teachers", teachers)):
        console.print(f"[bold]{title}[/bold]: {', '.join(names)}")
    return 0


def cmd_sweep(args) -> int:
    from rich.table import Table

    from distill.sweep import read_space, run_sweep, short_names

    _check_out_dir(args.out)
    console = _console()
    recipe = _load(args)
    space = read_space(args.space, args.param or [])
    result = run_sweep(
        recipe, args.trials, out=args.out, workers=args.workers, space=space, data_dir=args.data_dir,
        threads=args.threads, seed=args.seed, compare=not args.no_compare, overwrite=args.overwrite,
        verbose=not args.quiet, console=console,
    )
    paths = list(result.space)
    labels = short_names(paths, recipe.model_dump(mode="json"))
    metric = result.settings["metric"]
    done = sorted((r for r in result.trials if r["state"] == "COMPLETE"), key=lambda r: -r["val_score"])
    others = [r for r in result.trials if r["state"] != "COMPLETE"]
    table = Table(title=f"{recipe.name}: {len(result.trials)} trials, by validation {metric} "
                        f"({len(others)} pruned or failed; best 15 shown)")
    for column in ("trial", f"val {metric} %", "latency ms", "params", *(labels[p] for p in paths)):
        table.add_column(column, justify="right")
    for r in done[:15]:
        values = [f"{r[p]:.4g}" if isinstance(r[p], float) else str(r[p]) for p in paths]
        latency = f"{r['latency_ms']:.3f}" if r["latency_ms"] is not None else "–"
        table.add_row(f"{r['number']}{' (default)' if r['default'] else ''}", f"{100 * r['val_score']:.2f}",
                      latency, f"{r['params']:,}", *values)
    console.print(table)
    if result.importances:
        console.print("importance (fANOVA): " + ", ".join(f"{labels.get(k, k)} {v:.2f}"
                                                        for k, v in result.importances.items()), markup=False)
    c = result.comparison
    if c:
        def pct(x: dict) -> str:
            return f"{100 * x['score']:.2f} ± {100 * x['score_std']:.2f}%"

        console.print(f"test {metric} over seeds {c['seeds']}: best trial {pct(c['best'])}, default recipe "
                      f"{pct(c['default'])} ({c['gain_points']:+.2f} points)", markup=False)
        if "best_settings" in c:  # the search also changed the student: the settings alone, like for like
            console.print(f"the best trial's settings on the default student: {pct(c['best_settings'])} "
                          f"({c['gain_points_same_student']:+.2f} points over the default)", markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"best recipe: {result.best_recipe}; trials: {result.files['trials']}; plots: "
                  f"{', '.join(v for k, v in result.files.items() if k.endswith('_plot'))}", markup=False)
    return 0


def _values(items: list[str] | None, what: str) -> list | None:
    """``--widths 4 8 16``, ``--widths 4,8,16`` or ``--widths [64,64] [128,128]``, parsed as YAML."""
    import yaml

    if items is None:
        return None
    values = []
    for item in items:
        parts = [item] if item.strip().startswith("[") else [p for p in item.split(",") if p.strip()]
        for part in parts:
            try:
                values.append(yaml.safe_load(part))
            except yaml.YAMLError:
                raise DistillError(f"{what}: '{part}' is not a number or a list") from None
    return values


def cmd_ladder(args) -> int:
    from rich.table import Table

    from distill.ladder import parse_student, run_ladder

    _check_out_dir(args.out)
    console = _console()
    recipe = _load(args)
    students = [parse_student(s) for s in args.students] if args.students else None
    result = run_ladder(
        recipe, scales=_values(args.scales, "--scales"), widths=_values(args.widths, "--widths"),
        students=students, out=args.out, workers=args.workers, data_dir=args.data_dir, threads=args.threads,
        overwrite=args.overwrite, console=console,
    )
    t = result.teacher
    table = Table(title=f"{recipe.name}: capacity ladder, test {t['metric']} mean ± std over seeds "
                        f"{result.settings['seeds']} (teacher {100 * t['score']:.2f}%, {t['params']:,} params)")
    for column in ("student", "params", "latency ms", "alone %", "distilled %", "gain (points)"):
        table.add_column(column, justify="left" if column == "student" else "right")
    for r in result.rungs:
        latency = f"{r['latency_ms']:.3f}" if r["latency_ms"] is not None else "–"
        table.add_row(r["label"], f"{r['params']:,}", latency,
                      f"{100 * r['alone']:.2f} ± {100 * r['alone_std']:.2f}",
                      f"{100 * r['distilled']:.2f} ± {100 * r['distilled_std']:.2f}",
                      f"{100 * r['gain']:+.2f} ± {100 * r['gain_std']:.2f}")
    console.print(table)
    console.print(f"finding: {result.finding.text}", markup=False)
    if result.finding.advice:
        console.print(f"advice: {result.finding.advice}", markup=False)
        console.print(result.finding.assistant_yaml.rstrip(), markup=False, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"ladder: {result.files['json']}, plot {result.files['plot']}", markup=False)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {_one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _version() -> str:
    from distill.version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distill", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"distill {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set train.epochs=5 (repeatable)")
        p.add_argument("--data-dir", default=None, help="where data sets are stored (default: $DISTILL_DATA)")

    def run_options(p: argparse.ArgumentParser) -> None:
        recipe_options(p)
        p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--retrain-teacher", action="store_true",
                       help="train the teacher with teacher.train instead of loading teacher.weights "
                            "(e.g. a preset's shipped teacher)")
        p.add_argument("--pilot", action="store_true",
                       help="first choose temperature and term weights on a validation split carved from the "
                            "training data (a quarter of the run's budget; see the recipe's pilot: section)")

    p = sub.add_parser("demo", help="the whole pipeline on offline data (under 2 minutes)")
    run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a recipe: teacher, baseline, distilled student, report")
    p.add_argument("recipe", help="a YAML file or a preset name (see `distill list`)")
    run_options(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="one-batch dry run of a recipe")
    p.add_argument("recipe")
    recipe_options(p)
    p.add_argument("--suggest-taps", action="store_true",
                   help="propose teacher/student tap pairs for feature terms (relative depth and linear CKA)")
    p.add_argument("--top", type=int, default=4, help="how many tap pairs to propose (default 4)")
    p.set_defaults(func=cmd_check)

    def source_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input-shape", default=None, help="for a model name: one sample's shape, e.g. 3,32,32")
        p.add_argument("--classes", type=int, default=10, help="for a model name: number of classes (default 10)")
        p.add_argument("--data-dir", default=None, help="where the run's data set is stored (default: $DISTILL_DATA)")

    p = sub.add_parser("profile", help="params, size, MACs, peak memory and latency of models or a run's pair")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RUN",
                   help="a run directory (teacher vs student), or model names (the first is the reference)")
    source_options(p)
    p.add_argument("--weights", action="append", help="a weights file per model name (optional)")
    p.add_argument("--batch", type=int, default=32, help="the batch size timed besides 1 (default 32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime (default 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-onnx", action="store_true", help="do not time ONNX Runtime")
    p.add_argument("--out", default=None, help="also write the profile as JSON to this file")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="export a run's student (or a model) with a parity check")
    p.add_argument("model_or_run", metavar="RUN", help="a run directory, or a model name with --input-shape")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    p.add_argument("--quantize", choices=["int8"], default=None, help="dynamic int8 quantisation of linear layers")
    p.add_argument("--out", default=None, help="the file to write (default: RUN/export/student[-int8].EXT)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |logit difference|, times max(1, largest |logit|) (default 1e-4)")
    p.add_argument("--samples", type=int, default=256, help="test samples for the parity check (default 256)")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="with --quantize: fail when int8 test accuracy is lower than fp32 by more (a fraction)")
    p.add_argument("--weights", default=None, help="for a model name: its weights file")
    p.add_argument("--json", default=None, help="also write the export report as JSON to this file")
    source_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cache", help="run the teacher once over the training data and store its outputs")
    p.add_argument("recipe")
    recipe_options(p)
    p.add_argument("--out", required=True, help="the cache directory to write")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("sweep", help="Optuna search of a recipe on its validation split (needs distill[search])")
    p.add_argument("recipe")
    recipe_options(p)
    p.add_argument("--trials", type=int, required=True, help="how many trials (the first is the default recipe)")
    p.add_argument("--workers", type=int, default=None, help="parallel trial processes (default: cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads shared by the workers (default: cores)")
    p.add_argument("--out", default=None, help="output folder (default: sweeps/<recipe name>)")
    p.add_argument("--space", default=None, help="YAML file: field path -> {low, high, log, step, type} or {choices}")
    p.add_argument("--param", action="append", metavar="PATH=SPEC",
                   help="one searched field, e.g. 'train.lr={low: 0.0001, high: 0.01, log: true}' (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip running the default and best recipes on the test split afterwards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seeds", default=None, help="comma-separated seeds of the final comparison, e.g. 0,1,2")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ladder", help="students of increasing size, alone and distilled: the capacity gap")
    p.add_argument("recipe")
    recipe_options(p)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--scales", nargs="+", default=None, help="multiply the student's width (default 0.25,0.5,1,2,4)")
    sizes.add_argument("--widths", nargs="+", default=None, help="the student's width values, e.g. 4,8,16,32")
    sizes.add_argument("--students", nargs="+", default=None, metavar="SPEC",
                       help="student models as MODEL[,key=value...], e.g. cnn,width=4 mlp,hidden=[64]")
    p.add_argument("--workers", type=int, default=None, help="parallel run processes (default: cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads shared by the workers (default: cores)")
    p.add_argument("--out", default=None, help="output folder (default: ladders/<recipe name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    p.set_defaults(func=cmd_ladder)

    p = sub.add_parser("report", help="print and rewrite the report of a finished run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="models, losses, data sets and presets")
    p.set_defaults(func=cmd_list)
    return parser


class _NewFolders:
    """The data directory's folders before a command, so that a failed one can remove the empty folders
    it made (a download that never arrived leaves ``DATA_DIR/<data set>/`` behind otherwise)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        missing = [p for p in (root, *root.parents) if not p.exists()]
        self.top = missing[-1] if missing else None  # the highest folder this command may create
        self.before = {p.name for p in root.iterdir()} if root.is_dir() else set()

    def remove_empty(self) -> None:
        """Remove the folders made since, directly in the data directory or above it, that are empty."""
        try:
            if self.root.is_dir():
                for child in self.root.iterdir():
                    if child.name not in self.before and child.is_dir() and not child.is_symlink():
                        _rmdir(child)
            place = self.root
            while self.top is not None and _rmdir(place) and place != self.top:
                place = place.parent
        except OSError:
            pass


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()  # only an empty folder
        return True
    except OSError:
        return False


def _data_folders(args) -> _NewFolders | None:
    if not hasattr(args, "data_dir"):
        return None
    try:
        if args.data_dir:
            return _NewFolders(Path(args.data_dir).expanduser())
        from distill.data.registry import default_data_dir

        return _NewFolders(default_data_dir())
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    folders = _data_folders(args)
    code = 1
    try:
        code = args.func(args)
        return code
    except DistillError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if code != 0 and folders is not None:
            folders.remove_empty()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
