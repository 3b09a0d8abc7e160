"""User-facing errors.

A :class:`DistillError` is a mistake in the user's input (recipe, names, files, shapes) or a
condition the user can fix. The CLI prints its message on one line and exits with status 2;
the traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistillError(Exception):
    """An error the user can fix; its message says how."""


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates closest to ``name`` (for "did you mean" messages)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.0)
    return close


def unknown_name_error(kind: str, name: str, candidates: Iterable[str]) -> DistillError:
    """``unknown <kind> 'name'; nearest: a, b, c`` as a :class:`DistillError`."""
    candidates = sorted(candidates)
    near = nearest(name, candidates)
    hint = f"; nearest: {', '.join(near)}" if near else ""
    return DistillError(f"unknown {kind} '{name}'{hint}")
