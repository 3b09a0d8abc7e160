"""Imports run one way: the import graph of ``src/distill`` has no circle, and no module imports one
from a higher layer. Every import counts, those inside functions too (a lazy import is still a
dependency). The layers, lowest first (docs/architecture.md explains them):"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS: list[tuple[str, ...]] = [
    # 0: facts with no dependency on the field
    ("errors", "allocator", "schedules", "measure", "registry", "train_config", "boxes", "accelerate_compat",
     "version"),
    # 1: files, hooks and shapes
    ("checkpoints", "taps", "adapters", "sharding"),
    # 2: the rooms of the field: data, models, losses, teacher signals, logs
    ("logbook", "run_result", "signals", "data", "models", "losses", "plots", "report"),
    # 3: what reads them: metrics, the objective, the cache, the teacher gate, per-step transforms
    ("metrics", "ensemble", "batch_transforms", "objective", "cache", "token_cache", "quality"),
    # 4: the loop
    ("callbacks", "trainer", "mutual"),
    # 5: a stage (built in one place), and text models and their feeds
    ("stage", "nlp"),
    # 6: what differs between fields
    ("tasks",),
    # 7: recipes (typed YAML naming tasks, models, losses), finished runs, tap suggestions, the pilot
    ("recipes", "finished_run", "tap_suggest", "pilot"),
    # 8: whole runs and their checks, export
    ("pipeline", "check", "export"),
    # 9: what runs several runs, or profiles them
    ("shared_teacher", "profile", "sweep", "ladder"),
    # 10: the faces: the command line and the package
    ("cli", "__main__", ""),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in (SRC / "distill").rglob("*.py")}


def resolve(name: str) -> str | None:
    """The module of ``name`` (``distill.losses.kd.kd_loss`` -> ``distill.losses.kd``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except what sits under ``if TYPE_CHECKING:`` (names for type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str) -> set[str]:
    found = set()
    tree = ast.parse(MODULES[module].read_text())
    for node in _runtime_nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("distill"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("distill")]
        for name in names:
            target = resolve(name)
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    """The layer of a module: its top-level name under ``distill`` (``distill.losses.kd`` -> losses)."""
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer: add '{top}' to LAYERS in {Path(__file__).name}")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_faces(module: str) -> bool:
    """A package's ``__init__`` hands its modules' names on; a module importing names from its own
    package's face is not a circle in substance, and is left out."""
    return MODULES[module].name == "__init__.py"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_circles():
    graph = {m: {t for t in targets if not (package_faces(t) and m.startswith(t + "."))}
             for m, targets in GRAPH.items() if not package_faces(m) or m == "distill"}
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_runs_upward():
    upward = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m)
    )
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


@pytest.mark.parametrize("low", ["losses", "data", "models", "taps", "signals", "objective", "trainer"])
def test_the_core_imports_nothing_about_tasks_runs_or_the_cli(low):
    high = {"tasks", "pipeline", "recipes", "cli", "sweep", "ladder", "check", "stage"}
    for module, targets in GRAPH.items():
        if module.split(".")[1:2] == [low]:
            bad = [t for t in targets if t.split(".")[1:2] and t.split(".")[1] in high]
            assert not bad, f"{module} imports {bad}"


def test_the_checker_sees_an_upward_import():
    """The test above could pass vacuously if the graph were empty: it is not, and a made-up
    upward edge is caught."""
    assert sum(len(v) for v in GRAPH.values()) > 100
    assert layer_of("distill.losses.kd") < layer_of("distill.tasks.detection")
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_outside_the_tasks_imports_one_task_or_branches_on_a_task_name():
    """The pipeline knows only the Task interface: no module outside ``distill.tasks`` imports a
    particular task's module (tap suggestion did: it built classification models for every task),
    and none compares a task's name to a literal (``task.name == "classification"`` on 8da6390)."""
    specific = {m for m in MODULES if m.startswith("distill.tasks.") and m != "distill.tasks.base"}
    importers = sorted(f"{m} imports {t}" for m, targets in GRAPH.items()
                       if not m.startswith("distill.tasks") for t in targets if t in specific)
    assert not importers, importers
    branches = []
    for module, path in MODULES.items():
        if module.startswith("distill.tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
                sides = [node.left, *node.comparators]
                names = any(isinstance(s, ast.Attribute) and s.attr == "task" or
                            isinstance(s, ast.Attribute) and s.attr == "name" and "task" in ast.unparse(s.value)
                            for s in sides)
                literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
                if names and literal:
                    branches.append(f"{module}: {ast.unparse(node)}")
    assert not branches, branches
