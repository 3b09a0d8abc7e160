"""Deep mutual learning (Zhang et al. 2018): students that teach each other while they train.

    learner = MutualLearner([student_a, student_b], terms=[
        Term("ce", "ce"), Term("mimic", "kd", params={"temperature": 1.0}),
    ])
    learner.dry_run(batch); out = learner(batch)      # out.loss trains both

Each peer is trained with the same terms; for peer ``i`` the "teacher" is the others' average
output, computed from their current weights without gradient (the paper updates the peers in
turn, each against the others' fresh predictions). The peers run in training mode for that, as
in the paper: their predictions are what they would give at this step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.errors import DistillError
from distill.objective import Distiller, DistillOutput, DryRunReport, Term
from distill.signals import Batch, Feed, default_feed
from distill.taps import Taps


class PeerSignal:
    """The mean of some peer students' taps on a batch, without gradient (a teacher signal)."""

    def __init__(self, peers: Sequence[nn.Module], feed: Feed = default_feed) -> None:
        self.peers = list(peers)
        self.feed = feed
        self._taps: dict[tuple[str, ...], list[Taps]] = {}

    def _get(self, taps: Sequence[str]) -> list[Taps]:
        key = tuple(taps)
        if key not in self._taps:
            self._taps[key] = [Taps(p, key, owner=f"peer {i}") for i, p in enumerate(self.peers)]
        return self._taps[key]

    def validate_taps(self, taps: Sequence[str]) -> None:
        self._get(taps)

    @torch.no_grad()
    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        captured = [t.run(self.feed, p, batch) for t, p in zip(self._get(taps), self.peers)]
        return {k: torch.stack([c[k].detach().float() for c in captured]).mean(0) for k in captured[0]}


class MutualLearner(nn.Module):
    """Two or more students, each trained with ``terms`` against the others (DML).

    The output's terms are named ``<term>_<peer>`` (``ce_0``, ``kd_1``, ...); the loss is their
    weighted sum over all peers. :meth:`export_student` gives peer 0.
    """

    def __init__(
        self, students: Sequence[nn.Module], terms: Sequence[Term], feed: Feed = default_feed,
        num_samples: int | None = None,
    ) -> None:
        super().__init__()
        if len(students) < 2:
            raise DistillError("deep mutual learning needs at least two students")
        self.peers = nn.ModuleList(
            Distiller(s, PeerSignal([o for j, o in enumerate(students) if j != i], feed), terms, feed, num_samples)
            for i, s in enumerate(students)
        )

    @property
    def student(self) -> nn.Module:
        return self.peers[0].student

    def set_progress(self, epochs: float) -> None:
        for peer in self.peers:
            peer.set_progress(epochs)

    def forward(self, batch) -> DistillOutput:
        outs = [peer(batch) for peer in self.peers]
        terms = {f"{k}_{i}": v for i, out in enumerate(outs) for k, v in out.terms.items()}
        return DistillOutput(
            loss=sum(out.loss for out in outs), terms=terms, student=outs[0].student, teacher=outs[0].teacher
        )

    def dry_run(self, batch) -> DryRunReport:
        reports = [peer.dry_run(batch) for peer in self.peers]
        first = reports[0]
        return DryRunReport(
            student_taps=first.student_taps, teacher_taps=first.teacher_taps,
            adapters={f"{k}_{i}": v for i, r in enumerate(reports) for k, v in r.adapters.items()},
            terms={f"{k}_{i}": v for i, r in enumerate(reports) for k, v in r.terms.items()},
            problems=[f"peer {i}: {p}" for i, r in enumerate(reports) for p in r.problems],
        )

    def export_student(self) -> nn.Module:
        return self.peers[0].student
