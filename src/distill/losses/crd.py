"""Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
Representation Distillation").

Student and teacher features of the same sample are a positive pair, features of different
samples negative pairs; a critic trained with noise-contrastive estimation (NCE) tells them apart,
which maximises a lower bound on the mutual information between the two representations. As in
the paper, negatives come from two memory banks (one per side, one row per training sample)
rather than from the batch, so many negatives (16384) cost one gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss


def _feature_dim(shape, side: str) -> int:
    if not isinstance(shape, tuple) or len(shape) < 2:
        raise ValueError(
            f"crd reads one {side} tap of shape [B, D] (or [B, C, H, W], flattened), got {shape}"
        )
    return math.prod(shape[1:])


def nce_loss(logits: torch.Tensor, log_z: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss from critic scores ``[B, 1 + K]`` (positive first), as in the CRD code.

    ``P = exp(logit) / Z``; with noise probability ``Pn = 1/N`` and ``K`` negatives, the
    posterior of "from the data" is ``h = P / (P + K·Pn)``. Loss:
    ``−[log h(pos) + Σ_k log(1 − h(neg_k))]``, mean over samples (summed over negatives),
    computed in log space: ``softplus(c − log P_pos) + Σ_k softplus(log P_neg − c)``,
    ``c = log(K / N)``.
    """
    k = logits.shape[1] - 1
    c = math.log(k / num_samples)
    log_p = logits - log_z
    return (F.softplus(c - log_p[:, 0]) + F.softplus(log_p[:, 1:] - c).sum(dim=1)).mean()


@register_loss(
    "crd", inputs=("student", "teacher", "index"), module=True,
    exempt={
        "zero_at_match": "a contrastive (NCE) loss, a sum of softplus terms: positive for any inputs",
        "batch_order": "negatives are drawn at random for each row of the batch, so a permuted batch gets "
                       "other negatives (tests/test_methods_modules.py checks the order with them held fixed)",
    },
)
class CRDLoss(nn.Module):
    """CRD's NCE loss with linear embedding heads and two momentum memory banks.

    Inputs: student and teacher features ``[B, ...]`` (flattened to ``[B, D]``; the penultimate
    layer is the usual tap, e.g. ``fc:input``), and the batch's sample indices ``[B]`` (int64, in
    ``[0, num_samples)``). Each side has a linear head to ``feat_dim`` followed by L2
    normalisation. Scores are ``v · m / nce_t`` between the student embedding and rows of the
    *teacher* bank (the positive is the bank's row for the same sample, then ``nce_k`` negatives),
    and symmetrically between the teacher embedding and the student bank.

    Loss: ``nce(student anchor) + nce(teacher anchor)`` (see :func:`nce_loss`), each a mean over
    the batch of a sum over the ``1 + K`` scores.

    Details that follow the paper's code:

    - memory banks ``[num_samples, feat_dim]``, initialised uniform in ``[−stdv, stdv]`` with
      ``stdv = 1 / sqrt(feat_dim / 3)`` (rows of unit norm on average); after each training forward
      the rows at the batch's indices become ``normalise(m · row + (1 − m) · embedding)`` with
      ``m = momentum``, without gradient;
    - the NCE normaliser ``Z`` of each side is estimated once, on the first training batch, as
      ``N · mean(exp(scores))`` over all ``B × (1 + K)`` scores, and then kept fixed (a buffer,
      saved with checkpoints; a dry run restores it to "unset"). Forwards in eval mode update
      neither the banks nor ``Z``.

    Deviations: negatives are drawn uniformly from all *other* samples (never the positive; the
    paper draws uniformly with an alias sampler, positive allowed); ``nce_k`` is clamped to
    ``num_samples − 1``; the loss is computed in log space without the code's ``1e-7``. Each
    process of a data-parallel run keeps its own banks. Computation in float32.

    ``seed`` seeds the generator that draws the negatives (one per device). An index repeated
    within a batch updates its bank row once, from one of its occurrences.
    """

    needs = ("num_samples",)

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        *,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        super().__init__()
        ds, dt = _feature_dim(student_shape, "student"), _feature_dim(teacher_shape, "teacher")
        if num_samples is None or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(
                f"crd needs the training set's size (at least 2 samples), got num_samples={num_samples}"
            )
        if not (isinstance(feat_dim, int) and feat_dim > 0):
            raise ValueError(f"crd: feat_dim must be a positive integer, got {feat_dim}")
        if not (isinstance(nce_k, int) and nce_k > 0):
            raise ValueError(f"crd: nce_k must be a positive integer, got {nce_k}")
        if not nce_t > 0:
            raise ValueError(f"crd: nce_t must be positive, got {nce_t}")
        if not 0 <= momentum < 1:
            raise ValueError(f"crd: momentum must be in [0, 1), got {momentum}")
        self.student_dim, self.teacher_dim = ds, dt
        self.num_samples = num_samples
        self.nce_k = min(nce_k, num_samples - 1)
        self.nce_t = float(nce_t)
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.embed_student = nn.Linear(ds, feat_dim)
        self.embed_teacher = nn.Linear(dt, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_samples, feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_teacher", torch.rand(num_samples, feat_dim) * 2 * stdv - stdv)
        # log Z for [student anchor, teacher anchor]; NaN = not yet estimated
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self._generator: torch.Generator | None = None

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` sample indices drawn uniformly from ``{0..N−1} \\ {index[b]}`` for each row."""
        device = index.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        draws = torch.randint(
            0, self.num_samples - 1, (index.shape[0], self.nce_k), generator=self._generator, device=device
        )
        return draws + (draws >= index[:, None]).long()  # skip the positive: uniform over the others

    def embed(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings ``[B, feat_dim]`` of the (flattened, float32) features."""
        v_s = F.normalize(self.embed_student(student.float().flatten(1)), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher.float().flatten(1)), dim=1)
        return v_s, v_t

    def _check(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> None:
        for side, x, dim in (("student", student, self.student_dim), ("teacher", teacher, self.teacher_dim)):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or math.prod(x.shape[1:]) != dim:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"crd: expected a {side} feature of {dim} values per sample, got {got}")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"crd: student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}"
            )
        if (
            not isinstance(index, torch.Tensor)
            or index.shape != (student.shape[0],)
            or index.dtype.is_floating_point
            or index.dtype == torch.bool
        ):
            got = (f"{tuple(index.shape)} {index.dtype}" if isinstance(index, torch.Tensor)
                   else type(index).__name__)
            raise ValueError(
                f"crd: sample indices must be an integer tensor [B={student.shape[0]}], got {got}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(
                f"crd: sample indices must lie in [0, {self.num_samples}) (num_samples), "
                f"got {int(index.min())}..{int(index.max())}"
            )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self._check(student, teacher, index)
        index = index.long()
        return self.contrast(student, teacher, index, self.sample_negatives(index))

    def contrast(
        self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        """The loss with given negatives ``[B, K]`` (``forward`` samples them), then the bank update."""
        with torch.autocast(student.device.type, enabled=False):
            v_s, v_t = self.embed(student, teacher)
            rows = torch.cat([index[:, None], negatives], dim=1)  # [B, 1 + K], positive first
            # the student embedding against the teacher's bank, and the teacher's against the student's
            logits_s = torch.bmm(self.memory_teacher[rows], v_s[:, :, None]).squeeze(2) / self.nce_t
            logits_t = torch.bmm(self.memory_student[rows], v_t[:, :, None]).squeeze(2) / self.nce_t
            log_z = self.log_z
            if torch.isnan(log_z).any():
                # Z = N · mean(exp(scores)), in log space
                estimate = torch.stack([
                    torch.logsumexp(x.detach().flatten(), 0) + math.log(self.num_samples / x.numel())
                    for x in (logits_s, logits_t)
                ])
                log_z = torch.where(torch.isnan(log_z), estimate, log_z)
                if self.training:
                    self.log_z.copy_(log_z)
            n = self.num_samples
            loss = nce_loss(logits_s, log_z[0], n) + nce_loss(logits_t, log_z[1], n)
            if self.training:
                with torch.no_grad():
                    for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
                        moved = bank[index] * self.momentum + v.detach() * (1 - self.momentum)
                        bank.index_copy_(0, index, F.normalize(moved, dim=1))
            return loss
