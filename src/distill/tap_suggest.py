"""Which teacher layer should each student layer imitate? Tap pairs from depth and CKA.

Feature methods (FitNets hints, attention transfer, ...) need pairs of taps: a student layer and
the teacher layer it should match. :func:`suggest_taps` runs one batch through both models,
captures every candidate layer with :class:`distill.taps.Taps`, and scores each pair by

- **relative depth**: how far through its network a layer's output is produced, as a fraction:
  the position at which the module's forward pass finishes among all modules that run (the
  network's module list in execution order; a block finishes after its last submodule);
- **linear CKA** (Kornblith et al. 2019, "Similarity of Neural Network Representations
  Revisited") between the two layers' features on the batch: invariant to orthogonal transforms
  and isotropic scaling of either side, and comparable across different widths.

``score = CKA - depth_weight * |depth_student - depth_teacher|``. Pairs are chosen greedily by
score, each tap at most once and without crossings (a deeper student layer never pairs with a
shallower teacher layer than an earlier pair), so the result is a usable set of hint terms. Only
pairs whose shapes an adapter can map (:func:`distill.adapters.make_adapter`) are proposed.

Features are flattened per sample; maps with spatial axes (``[B, C, H, W]``, ``[B, C, L]``) are
first averaged over those axes (``pool=True``, the default), so CKA compares per-channel
statistics and layers of different resolutions stay comparable on a small batch (a flattened
conv map has far more dimensions than samples, where linear CKA saturates towards 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.signals import Feed, default_feed
from distill.taps import Taps


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` [n, p] and ``y`` [n, q] of the same ``n`` samples, in [0, 1].

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``,
    computed through the ``n x n`` Gram matrices (cheap when features are wide) in float64.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides, got {x.shape[0]} and {y.shape[0]}")
    x = x.detach().reshape(x.shape[0], -1).double()
    y = y.detach().reshape(y.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    denominator = torch.linalg.norm(k) * torch.linalg.norm(l)
    if denominator == 0:
        return 0.0
    return float((k * l).sum() / denominator)


def features_for_cka(t: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """``[B, ...]`` -> ``[B, d]``: averaged over the axes after the channel axis (``pool``), then
    flattened."""
    if pool and t.dim() >= 3:
        t = t.mean(dim=tuple(range(2, t.dim())))
    return t.reshape(t.shape[0], -1)


@dataclass
class TapPair:
    student: str
    teacher: str
    student_depth: float
    teacher_depth: float
    cka: float
    score: float
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]


@dataclass
class TapSuggestions:
    pairs: list[TapPair]  # the chosen, non-crossing pairs, shallow to deep
    candidates: list[TapPair]  # every scored pair, best first
    notes: list[str] = field(default_factory=list)

    def yaml_snippet(self, loss: str = "hint", weight: float = 1.0) -> str:
        """Terms to paste under ``distill.terms`` of a recipe."""
        import yaml

        lines = [f"# {loss} terms proposed by `distill check --suggest-taps` (paste under distill.terms)"]
        for pair in self.pairs:
            term = {"name": f"{loss}_{pair.student}".replace(".", "_").replace(":", "_"), "loss": loss,
                    "weight": weight, "student": pair.student, "teacher": pair.teacher}
            lines.append("- " + yaml.safe_dump(term, default_flow_style=True, sort_keys=False, width=200).strip())
        return "\n".join(lines) + "\n"


def candidate_taps(model: nn.Module) -> list[str]:
    """The layers worth pairing: ``model.feature_taps`` for zoo models; otherwise the root's
    children, with containers (Sequential, ModuleList, ModuleDict) opened one level."""
    taps = getattr(model, "feature_taps", None)
    if taps:
        return list(taps)
    out = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            out += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            out.append(name)
    return out


def relative_depths(model: nn.Module, x: Any, feed: Feed | None = None) -> dict[str, float]:
    """Each module's depth: the rank at which its forward finished among all modules that ran
    in ``model(x)`` (``feed(model, x)`` for a batch), over their number (the last module to finish
    has depth 1)."""
    finished: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_a, name=name: finished.append(name))
        for name, module in model.named_modules() if name
    ]
    try:
        with torch.no_grad():
            feed(model, x) if feed is not None else model(x)
    finally:
        for handle in handles:
            handle.remove()
    order: dict[str, int] = {}
    for i, name in enumerate(finished):
        order.setdefault(name, i)  # a module run twice counts at its first completion
    total = max(len(finished), 1)
    return {name: (i + 1) / total for name, i in order.items()}


def _depth(depths: dict[str, float], tap: str) -> float:
    module, _, kind = tap.partition(":")
    depth = depths.get(module, 0.0)
    if kind == "input":  # the input of a module is ready just before it runs
        depth = max(0.0, depth - 1.0 / max(len(depths), 1))
    return depth


def _capture(model: nn.Module, taps: Sequence[str], batch: Any, feed: Feed, owner: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        captured = Taps(model, taps, owner=owner).run(feed, model, batch)
    logits = captured.pop("logits")
    size = logits.shape[0]
    # keep batch-first tensors that are not the model's output itself
    return {k: v for k, v in captured.items() if v.dim() >= 2 and v.shape[0] == size and v is not logits}


def suggest_taps(
    teacher: nn.Module,
    student: nn.Module,
    inputs: Any,
    *,
    feed: Feed | None = None,
    teacher_taps: Sequence[str] | None = None,
    student_taps: Sequence[str] | None = None,
    depth_weight: float = 1.0,
    pool: bool = True,
    top: int = 4,
) -> TapSuggestions:
    """Score every (student tap, teacher tap) pair on ``inputs`` and choose up to ``top``
    non-crossing pairs (see the module). ``inputs`` is a tensor both models take, or, with ``feed``
    (a task's ``feed(model, batch)``), a batch. Both models are run in eval mode."""
    if feed is None:
        inputs, feed = {"input": inputs}, default_feed
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    try:
        t_taps = list(teacher_taps or candidate_taps(teacher))
        s_taps = list(student_taps or candidate_taps(student))
        t_feats = _capture(teacher, t_taps, inputs, feed, "teacher")
        s_feats = _capture(student, s_taps, inputs, feed, "student")
        t_depth, s_depth = relative_depths(teacher, inputs, feed), relative_depths(student, inputs, feed)
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    if not t_feats or not s_feats:
        raise DistillError("no candidate taps captured a batch-first feature on "
                           + ("the teacher" if not t_feats else "the student"))
    t_pooled = {k: features_for_cka(v, pool) for k, v in t_feats.items()}
    candidates, unadaptable = [], 0
    for s_name, s_value in s_feats.items():
        s_pooled = features_for_cka(s_value, pool)
        for t_name, t_value in t_feats.items():
            if not _adaptable(s_value.shape, t_value.shape):
                unadaptable += 1
                continue
            cka = linear_cka(s_pooled, t_pooled[t_name])
            ds, dt = _depth(s_depth, s_name), _depth(t_depth, t_name)
            candidates.append(TapPair(s_name, t_name, ds, dt, cka, cka - depth_weight * abs(ds - dt),
                                      tuple(s_value.shape[1:]), tuple(t_value.shape[1:])))
    candidates.sort(key=lambda p: p.score, reverse=True)
    chosen: list[TapPair] = []
    for pair in candidates:
        if len(chosen) >= top:
            break
        crossing = any(
            pair.student == c.student or pair.teacher == c.teacher
            or (pair.student_depth - c.student_depth) * (pair.teacher_depth - c.teacher_depth) < 0
            for c in chosen
        )
        if not crossing:
            chosen.append(pair)
    chosen.sort(key=lambda p: p.student_depth)
    notes = []
    if unadaptable:
        notes.append(f"{unadaptable} pair(s) left out: no adapter maps those feature shapes (they differ in rank)")
    return TapSuggestions(pairs=chosen, candidates=candidates, notes=notes)


def _adaptable(student_shape: torch.Size, teacher_shape: torch.Size) -> bool:
    """Whether :func:`distill.adapters.make_adapter` can map the student feature to the teacher's."""
    from distill.adapters import make_adapter

    try:
        make_adapter(tuple(student_shape), tuple(teacher_shape))
    except DistillError:
        return False
    return True


def suggest_for_recipe(
    recipe, data_dir: str | Path | None = None, *, samples: int = 128, top: int = 4, depth_weight: float = 1.0
) -> TapSuggestions:
    """:func:`suggest_taps` for a recipe's teacher and student (built by its task) on one batch of
    ``samples`` training samples, fed to each model by the task (the test split is not read)."""
    from distill.tasks.base import get_task

    task = get_task(recipe.task)
    prepared = task.prepare(recipe, data_dir)
    seed = recipe.seeds[0]
    teacher = task.build_model(recipe.teacher, prepared, seed)
    student = task.build_model(recipe.student, prepared, seed)
    batch = next(iter(task.train_loader(recipe, prepared, samples, seed)))
    result = suggest_taps(teacher, student, batch, feed=task.feed, top=top, depth_weight=depth_weight)
    if recipe.teacher.weights is None and not recipe.teacher.pretrained:
        result.notes.append(
            "the teacher is untrained here (no teacher.weights): CKA reflects its architecture only; "
            "pass --set teacher.weights=runs/NAME/teacher.safetensors for a trained one"
        )
    return result
