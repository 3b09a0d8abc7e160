"""The ``distill`` command line.

    distill demo                      the whole pipeline on offline data, in under two minutes
    distill run RECIPE [--set k=v]    teacher → baseline → distilled student → report
    distill check RECIPE              one-batch dry run: taps, adapters, term values, gradients
    distill cache RECIPE --out DIR    run the teacher once, store its outputs for training
    distill report RUN_DIR            print the table of a finished run and rewrite report.md
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


def _print_results(console, results: dict) -> None:
    from rich.table import Table

    from distill.report import HEADER, table_rows

    table = Table(title=f"{results.get('recipe')}: test set, mean ± std over seeds {results.get('seeds')}")
    for column in HEADER:
        table.add_column(column, justify="right" if column else "left")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold]{results.get('verdict', '')}[/bold]")


def _load(args) -> "Recipe":  # noqa: F821
    from distill.recipes import load_recipe

    overrides = list(args.set or [])
    if getattr(args, "seeds", None):
        overrides.append(f"seeds=[{args.seeds}]")
    return load_recipe(args.recipe, overrides)


def _run(args, recipe_source: str | None = None) -> int:
    from distill.pipeline import run_recipe

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
        overwrite=args.overwrite, progress=not args.quiet, console=console,
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


def cmd_cache(args) -> int:
    from distill.pipeline import build_model, make_cache, prepare_data

    console = _console()
    recipe = _load(args)
    if recipe.teacher.weights is None:
        raise DistillError(
            "distill cache needs a trained teacher: set teacher.weights (for example "
            "--set teacher.weights=runs/NAME/teacher.safetensors from a finished run)"
        )
    started = time.perf_counter()
    prepared = prepare_data(recipe, args.data_dir)
    teacher = build_model(recipe.teacher, prepared.data, recipe.seeds[0])
    path = make_cache(recipe, teacher, prepared, args.out)
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

    console = _console()
    for title, names in (("models", MODELS.names()), ("losses", LOSSES.names()),
                         ("data sets", DATASETS.names()), ("presets", preset_names())):
        console.print(f"[bold]{title}[/bold]: {', '.join(names)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {_one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distill", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set distill.train.epochs=5 (repeatable)")
        p.add_argument("--data-dir", default=None, help="where data sets are stored (default: $DISTILL_DATA)")

    def run_options(p: argparse.ArgumentParser) -> None:
        recipe_options(p)
        p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

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
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cache", help="run the teacher once over the training data and store its outputs")
    p.add_argument("recipe")
    recipe_options(p)
    p.add_argument("--out", required=True, help="the cache directory to write")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("report", help="print and rewrite the report of a finished run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="models, losses, data sets and presets")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DistillError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
