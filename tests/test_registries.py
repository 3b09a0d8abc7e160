"""Registries discover their modules: a new task, data set or loss is one new file, no list to edit."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import distill.tasks

TASK_DIR = Path(distill.tasks.__file__).parent


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_task_module_registers_the_task_it_is_named_after():
    from distill.tasks.base import TASKS, all_tasks

    tasks = all_tasks()
    modules = sorted(m.name for m in pkgutil.iter_modules([str(TASK_DIR)]) if m.name != "base")
    assert sorted(name.replace("-", "_") for name in tasks) == modules
    for name in tasks:  # get_task finds a task's module from its name
        assert type(tasks[name]).__module__ == f"distill.tasks.{name.replace('-', '_')}"
        assert TASKS.get(name) is type(tasks[name])


def test_a_task_imports_only_its_own_module():
    loaded = _fresh(
        "import sys; from distill.tasks.base import get_task; get_task('ranking'); "
        "print(sorted(m for m in sys.modules if m.startswith('distill.tasks.')))"
    )
    assert loaded == "['distill.tasks.base', 'distill.tasks.ranking']"


def test_data_sets_are_registered_by_their_own_modules_without_importing_a_task():
    """Before, `text` registered only when the causal-LM task was imported, and `stsb` when the
    sentence-embedding task was."""
    out = _fresh(
        "import sys, distill.data, distill.nlp.stsb; from distill.data import DATASETS; "
        "print(sorted(DATASETS.names())); print([m for m in sys.modules if m.startswith('distill.tasks')])"
    )
    names, tasks = out.splitlines()
    assert "'text'" in names and "'stsb'" in names and "'tinyshakespeare'" in names
    assert tasks == "[]"


def test_every_zoo_module_is_imported_by_the_package_without_a_list():
    """`distill.models` imported its zoo modules by a hand list; it now imports every module of the
    package, so a new model family is one file."""
    import distill.models

    out = _fresh("import sys, distill.models; print(sorted(m for m in sys.modules if m.startswith('distill.models.')))")
    modules = sorted(f"distill.models.{m.name}" for m in pkgutil.iter_modules(distill.models.__path__))
    assert out == str(modules)
    registered = {type(None) if f is None else getattr(f, "__module__", "") for f in
                  (distill.models.MODELS.get(n) for n in distill.models.MODELS.names())}
    assert {"distill.models.cnn", "distill.models.gpt", "distill.models.wrn"} <= registered
