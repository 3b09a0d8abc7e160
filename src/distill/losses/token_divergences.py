"""Token-level divergences for distilling causal language models.

Every loss here compares, at each scored position, the teacher's next-token distribution ``p_t``
with the student's ``p_s`` (both ``softmax(logits / T)``), and averages over the scored positions:

- ``token_fkl``: forward KL(p_t ‖ p_s), mode-covering (the word-level KD of Kim & Rush 2016);
- ``token_rkl``: reverse KL(p_s ‖ p_t), mode-seeking (MiniLLM, Gu et al. 2024);
- ``token_gjsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes"),
  ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)`` with ``m = β p_t + (1 − β) p_s``;
- ``token_tvd``: total variation distance ``½ Σ |p_t − p_s|`` (used as a loss in DistiLLM's and
  f-distill's comparisons);
- ``token_skl`` / ``token_srkl``: the skew KL and skew reverse KL of DistiLLM (Ko et al. 2024,
  "DistiLLM: Towards Streamlined Distillation for Large Language Models"),
  ``KL(p_t ‖ α p_t + (1 − α) p_s)`` and ``KL(p_s ‖ (1 − α) p_t + α p_s)``.

**Shapes.** ``student_logits`` ``[B, T, V_s]`` (any leading shape ``[..., V_s]``); ``teacher_logits``
``[B, T, V_t]`` with the same leading shape, or a top-k teacher (below); ``mask`` ``[B, T]``, nonzero
at the positions to score (``None``: all of them). The objective feeds it from the batch (input kind
``"mask"``, see :mod:`distill.objective`).

**Reduction.** Sum over the vocabulary, then the mean over the scored positions of the whole
batch (each real token weighs the same, whichever sequence it is in). A batch with no scored
position gives 0. The KL-type losses are multiplied by T², like ``kd``, so gradient magnitudes stay
comparable across temperatures; ``token_tvd`` is not (it is bounded by 1).

**Vocabularies.** Models often pad their output layer (GPT-2's 50,257 tokens to 50,304). Both sides
are cut to the common real vocabulary: ``vocab_size`` when given (both must have at least that many
logits; the rest are ignored), otherwise the narrower width, which is only accepted when the wider
one is the narrower rounded up to a multiple of 8, 16, 32, 64, 128 or 256. Anything else is not
padding but another vocabulary, and raises a ``ValueError`` (a ``DistillError`` through the
objective). The cut logits get no gradient.

**Memory.** The flattened positions are processed ``chunk_tokens`` rows at a time: a chunk is cast to
fp32, its loss and its gradient with respect to the logits are computed (autograd on that chunk
alone; for forward KL and token CE a closed form, ``T (p_s - p_t)`` and ``p_s - onehot``, in a few
passes over the chunk, the cost of CE: ``benchmarks/lm_scale.py cache_steps`` times both), the
gradient is written into a buffer of the logits' shape and dtype, and the chunk's fp32
tensors are freed before the next. Backward then only scales that buffer. So besides the logits
and their gradient (which any loss needs), at most one chunk of ``[chunk_tokens, V]`` fp32
intermediates is alive, never the whole ``B × T × V`` in fp32, and padded positions are not computed
at all. The gradient is computed in the forward pass only when grad mode is on and an input needs
one; higher-order gradients are not supported. Measured (``tests/test_token_losses.py``, ``token_gjsd``,
``[4, 256, 512]`` logits from a linear layer): forward and backward allocate at most 1.8× the
logits' size with 64-token chunks (1× is their gradient, the rest about 27 chunk-sized fp32
temporaries; a weighted term adds a scaled copy of the gradient in backward), against 13.5× in
one chunk and 11× for the same formula in plain autograd. The logits themselves (both models'
``[tokens, V]``) are not avoided here: :mod:`distill.losses.fused_head` takes the output heads
instead and computes the logits chunk by chunk inside the loss.

**Top-k teachers.** With ``topk=k`` the two distributions (after the temperature) are compared
after coarsening them to ``k + 1`` outcomes: the teacher's k most probable tokens, and one tail bucket holding the rest of
the mass (each side's own mass on the other tokens). Forward KL on these buckets is the KL
against a teacher stored as top-k log-probabilities plus its tail mass, with no assumption on how
that tail is spread. A :class:`~distill.cache.TeacherCache` built with ``topk=k`` returns rebuilt
logits whose top k are the stored ones and whose other tokens share the stored tail evenly; with
``topk=k`` the loss reads back exactly the stored top-k and tail mass (with the dense rebuilt
logits alone, the KL would also score the invented even spread). The teacher may also be given
explicitly as ``(log_probs [B, T, k], indices [B, T, k], tail_mass [B, T])`` (a :class:`TopK`, or a
list of three tensors from three teacher taps); it then needs temperature 1 (a tail mass cannot be
re-tempered) and gets no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from distill.losses.registry import register_loss

_PADDING_MULTIPLES = (8, 16, 32, 64, 128, 256)
_TINY = 1e-30  # floor of an explicit tail mass, so its logarithm stays finite

RowLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TopK(NamedTuple):
    """A teacher given as its top-k next-token log-probabilities and the mass outside them.

    ``log_probs``: ``[..., k]`` log-probabilities at T = 1; ``indices``: ``[..., k]`` token ids;
    ``tail``: ``[...]`` probability mass of every other token.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor


# ------------------------------------------------------------------------- divergences on rows
def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities ``[n, V]``; tokens with p = 0 add nothing.

    Both sides are zeroed where p = 0 before the product, so neither the value nor the gradient
    sees ``0 · (−inf)``."""
    keep = log_p > -math.inf
    lp, lq = torch.where(keep, log_p, 0.0), torch.where(keep, log_q, 0.0)
    return torch.where(keep, lp.exp() * (lp - lq), 0.0).sum(-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for 0 < w < 1, in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return _kl(log_t, log_s)


def reverse_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return _kl(log_s, log_t)


def generalized_jsd(beta: float) -> RowLoss:
    """GKD's JSD(β): β = 0 is exactly forward KL and β = 1 exactly reverse KL (see ``token_gjsd``)."""
    if beta == 0.0:
        return forward_kl
    if beta == 1.0:
        return reverse_kl

    def rows(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        log_m = _mixture(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)

    return rows


def total_variation(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def skew_kl(alpha: float) -> RowLoss:
    """KL(p_t ‖ α p_t + (1 − α) p_s); α = 0 is forward KL."""
    if alpha == 0.0:
        return forward_kl
    return lambda log_t, log_s: _kl(log_t, _mixture(log_t, log_s, alpha))


def skew_reverse_kl(alpha: float) -> RowLoss:
    """KL(p_s ‖ (1 − α) p_t + α p_s); α = 0 is reverse KL."""
    if alpha == 0.0:
        return reverse_kl
    return lambda log_t, log_s: _kl(log_s, _mixture(log_s, log_t, alpha))


# ------------------------------------------------------------------------- checks
def common_vocab(student_width: int, teacher_width: int, vocab_size: int | None) -> int:
    """The number of leading logits both sides are compared on (see the module docstring)."""
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        short = [f"{side} has {width}" for side, width in (("student", student_width), ("teacher", teacher_width))
                 if width < vocab_size]
        if short:
            raise ValueError(
                f"vocab_size={vocab_size}, but the {' and the '.join(short)} logits per token; "
                "set vocab_size to the real vocabulary both models share"
            )
        return vocab_size
    if student_width == teacher_width:
        return student_width
    narrow, wide = sorted((student_width, teacher_width))
    if any(wide == -(-narrow // m) * m for m in _PADDING_MULTIPLES):
        return narrow
    raise ValueError(
        f"the student has {student_width} logits per token and the teacher {teacher_width}: not one "
        f"vocabulary padded to a multiple of 8-256, so the models do not share a vocabulary; if their "
        f"first N tokens are the same, set vocab_size=N"
    )


def _check_common(name: str, student: tuple[int, ...], lead: tuple[int, ...], mask, temperature: float,
                  chunk_tokens: int):
    """``student``: the shape of the student's logits ``[..., V]``; ``lead``: the teacher's positions."""
    if len(student) < 2:
        raise ValueError(f"{name}: student logits must be [..., V] (e.g. [B, T, V]), got {student}")
    if student[:-1] != lead:
        raise ValueError(
            f"{name}: student logits {student} and teacher {lead + ('...',)} differ in their "
            "positions; both must be [B, T, ...] for the same tokens"
        )
    if mask is not None and tuple(mask.shape) != lead:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match the logits' positions {lead}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name}: temperature must be positive, got {temperature!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"{name}: chunk_tokens must be a positive integer, got {chunk_tokens!r}")


# ------------------------------------------------------------------------- chunked evaluation
class _Plan(NamedTuple):
    vocab: int
    chunk: int
    rows: torch.Tensor | None  # flat indices of the scored positions, or None for all of them
    count: int  # scored positions
    temperature: float
    scale: float  # T² for the KL family, 1 otherwise
    topk: int | None  # coarsen to the teacher's top k plus a tail bucket
    mode: str  # "dense" teacher logits, "explicit" top-k (log_probs, indices, tail), or "labels"


def _log_softmax_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def _bucket(log_p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[n, k + 1]``: log p at ``index`` ``[n, k]``, then the log of the mass everywhere else."""
    top = log_p.gather(-1, index)
    if index.shape[-1] >= log_p.shape[-1]:  # nothing outside: an empty bucket (no gradient to take)
        rest = log_p.new_full((*top.shape[:-1], 1), -math.inf)
    else:
        rest = torch.logsumexp(log_p.scatter(-1, index, -math.inf), dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def _chunk_rows(plan: _Plan, row_loss: RowLoss, s: torch.Tensor, teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-position losses ``[n]`` of one chunk (``s`` ``[n, V]`` student logits, fp32 or not)."""
    log_s = _log_softmax_rows(s, plan.temperature)
    if plan.mode == "labels":
        return -log_s.gather(-1, teacher[0].long().unsqueeze(-1)).squeeze(-1)
    if plan.mode == "explicit":
        values, index, tail = teacher
        index = index.long()
        log_t = torch.cat([values.float(), tail.float().clamp_min(_TINY).log().unsqueeze(-1)], dim=-1)
        log_t = torch.log_softmax(log_t, dim=-1)  # renormalise stored (e.g. fp16-rounded) values
        log_s = _bucket(log_s, index)
    else:
        log_t = _log_softmax_rows(teacher[0], plan.temperature)
        if plan.topk is not None and plan.topk < plan.vocab:
            index = log_t.topk(plan.topk, dim=-1).indices
            log_t, log_s = _bucket(log_t, index), _bucket(log_s, index)
    return row_loss(log_t, log_s) * plan.scale


def chunk_value_and_grad(
    plan: _Plan, row_loss: RowLoss, s: torch.Tensor, teacher: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's share of the mean loss (a 0-d fp32 tensor: the sum of its rows over
    ``plan.count``) and its gradient with respect to the student logits ``s`` ``[n, V]`` (fp32).

    Forward KL and cross-entropy have closed-form gradients (``T (p_s - p_t)`` on the compared
    outcomes; on a top-k teacher's tail, each tail token's ``p_s`` times ``1 - t_tail / s_tail``),
    computed in a few passes over ``[n, V]`` instead of autograd's graph of the row loss; the other
    divergences, and rows whose student tail mass underflows fp32, go through autograd on the chunk."""
    closed = _closed_form(plan, row_loss, s, teacher)
    if closed is not None:
        return closed
    with torch.enable_grad():
        leaf = s.detach().float().requires_grad_(True)
        part = _chunk_rows(plan, row_loss, leaf, teacher).sum() / plan.count
        (grad,) = torch.autograd.grad(part, leaf)
    return part.detach(), grad


def _closed_form(
    plan: _Plan, row_loss: RowLoss, s: torch.Tensor, teacher: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`chunk_value_and_grad` for forward KL and labels, or None where it does not apply."""
    if plan.mode == "labels":
        log_s = _log_softmax_rows(s, 1.0)
        label = teacher[0].long().unsqueeze(-1)
        value = -log_s.gather(-1, label).sum() / plan.count
        grad = log_s.exp_()
        grad.scatter_add_(-1, label, grad.new_full(label.shape, -1.0))
        return value, grad.div_(plan.count)
    if row_loss is not forward_kl:
        return None
    temperature = plan.temperature
    log_s = _log_softmax_rows(s, temperature)
    if plan.mode == "dense" and (plan.topk is None or plan.topk >= plan.vocab):
        log_t = _log_softmax_rows(teacher[0], temperature)
        value = _kl(log_t, log_s).sum()
        grad = log_s.exp_().sub_(log_t.exp_())
    else:
        if plan.mode == "explicit":
            values, index, tail = teacher
            index = index.long()
            t_top = torch.cat([values.float(), tail.float().clamp_min(_TINY).log().unsqueeze(-1)], dim=-1)
            t_top = torch.log_softmax(t_top, dim=-1)
        else:
            log_t = _log_softmax_rows(teacher[0], temperature)
            index = log_t.topk(plan.topk, dim=-1).indices
            t_top = _bucket(log_t, index)
            del log_t
        if index.shape[-1] >= log_s.shape[-1]:
            return None
        s_top = log_s.gather(-1, index)
        grad = log_s.exp_()  # p_s, in place of its logarithm
        grad.scatter_(-1, index, 0.0)
        s_tail = grad.sum(-1, keepdim=True)  # the student's mass outside the teacher's top k
        if not bool((s_tail > 1e-30).all()):
            return None  # a tail too small for fp32 sums: autograd's log-space path
        log_s_top = torch.cat([s_top, s_tail.log()], dim=-1)
        value = _kl(t_top, log_s_top).sum()
        p_t = t_top.exp()
        grad.mul_(1.0 - p_t[:, -1:] / s_tail)  # tail tokens: p_s (1 - t_tail / s_tail)
        grad.scatter_(-1, index, s_top.exp() - p_t[:, :-1])  # top k: p_s - p_t
    scale = plan.scale / temperature / plan.count  # d/ds of T^2 KL(softmax(t/T) || softmax(s/T))
    return value * (plan.scale / plan.count), grad.mul_(scale)


def _flat(tensor: torch.Tensor, width: int | None) -> torch.Tensor:
    """``[..., W]`` -> ``[N, width]`` (a view when the layout allows), or ``[...]`` -> ``[N]``."""
    if width is None:
        return tensor.reshape(-1)
    return tensor[..., :width].reshape(-1, width)


def _evaluate(
    plan: _Plan, row_loss: RowLoss, student: torch.Tensor, teacher: Sequence[torch.Tensor], need: Sequence[bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The mean loss over scored positions, and the gradients of the inputs in ``need`` (else None)."""
    vocab = plan.vocab
    s_flat = _flat(student, vocab)
    if plan.mode == "explicit":
        widths: tuple[int | None, ...] = (teacher[0].shape[-1], teacher[1].shape[-1], None)
    else:
        widths = (vocab,) if plan.mode == "dense" else (None,)
    t_flat = [_flat(t, w) for t, w in zip(teacher, widths)]
    grads: list[torch.Tensor | None] = [
        torch.zeros_like(x, memory_format=torch.contiguous_format) if n else None
        for x, n in zip([student, *teacher], need)
    ]
    g_flat = [None if g is None else _flat(g, w) for g, w in zip(grads, (vocab, *widths))]
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    if plan.count == 0:
        return total.to(torch.float32), grads
    any_grad = any(need)
    positions = plan.rows.numel() if plan.rows is not None else s_flat.shape[0]
    for start in range(0, positions, plan.chunk):
        where = (
            plan.rows[start:start + plan.chunk] if plan.rows is not None
            else slice(start, min(start + plan.chunk, positions))
        )
        pieces = [s_flat[where], *(t[where] for t in t_flat)]
        if not any_grad:
            with torch.no_grad():
                total += _chunk_rows(plan, row_loss, pieces[0], pieces[1:]).sum().double() / plan.count
            continue
        if need[0] and not any(need[1:]):  # the student alone: closed forms where they exist
            part, student_grad = chunk_value_and_grad(plan, row_loss, pieces[0], pieces[1:])
            found = iter([student_grad])
        else:
            with torch.enable_grad():
                leaves = [p.detach().float().requires_grad_(n) if n else p.detach() for p, n in zip(pieces, need)]
                part = _chunk_rows(plan, row_loss, leaves[0], leaves[1:]).sum() / plan.count
                wanted = [leaf for leaf, n in zip(leaves, need) if n]
                found = iter(torch.autograd.grad(part, wanted))
        for g, n in zip(g_flat, need):
            if not n:
                continue
            chunk_grad = next(found)
            if isinstance(where, slice):
                g[where] = chunk_grad.to(g.dtype)
            else:
                g.index_copy_(0, where, chunk_grad.to(g.dtype))
        total += part.detach().double()
        del part, found
    return total.to(torch.float32), grads


class _ChunkedTokenLoss(torch.autograd.Function):
    """The loss and its gradients from :func:`_evaluate` in forward; backward scales the gradients."""

    @staticmethod
    def forward(ctx, plan: _Plan, row_loss: RowLoss, student: torch.Tensor, *teacher: torch.Tensor):
        need = list(ctx.needs_input_grad[2:])
        if plan.mode != "dense":
            need[1:] = [False] * len(teacher)  # top-k teachers and labels get no gradient
        value, grads = _evaluate(plan, row_loss, student, teacher, need)
        ctx.grads = grads
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if float(grad_output) == 1.0:  # the common case: hand the buffers over without a copy
            return (None, None, *ctx.grads)
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads]
        return (None, None, *scaled)


# ------------------------------------------------------------------------- the common entry
def _teacher_parts(name: str, teacher) -> tuple[list[torch.Tensor], bool]:
    if isinstance(teacher, torch.Tensor):
        return [teacher], False
    if isinstance(teacher, (tuple, list)) and len(teacher) == 3 and all(isinstance(t, torch.Tensor) for t in teacher):
        return list(teacher), True
    raise ValueError(
        f"{name}: the teacher must be logits [B, T, V] or a top-k teacher (log_probs [B, T, k], "
        f"indices [B, T, k], tail_mass [B, T]), got {type(teacher).__name__}"
    )


def token_divergence(
    name: str,
    row_loss: RowLoss,
    student_logits: torch.Tensor,
    teacher,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    chunk_tokens: int,
    vocab_size: int | None,
    topk: int | None,
    kl_family: bool,
) -> torch.Tensor:
    """Mean of ``row_loss`` over the scored positions, chunked (the module docstring has the rules).

    ``row_loss(log_t, log_s)`` maps fp32 log-probabilities ``[n, V']`` to per-position values ``[n]``.
    """
    parts, explicit = _teacher_parts(name, teacher)
    plan = divergence_plan(name, tuple(student_logits.shape), parts if explicit else tuple(parts[0].shape), mask,
                           student_logits.device, temperature=temperature, chunk_tokens=chunk_tokens,
                           vocab_size=vocab_size, topk=topk, kl_family=kl_family)
    return _apply(plan, row_loss, student_logits, parts)


def divergence_plan(
    name: str,
    student_shape: tuple[int, ...],
    teacher: tuple[int, ...] | Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    device: torch.device,
    *,
    temperature: float,
    chunk_tokens: int,
    vocab_size: int | None,
    topk: int | None,
    kl_family: bool,
) -> _Plan:
    """Check a token divergence's arguments and plan its chunks, from the shapes of the logits (which
    need not exist: :mod:`distill.losses.fused_head` computes them chunk by chunk).

    ``student_shape``: the student logits' ``[..., V_s]``; ``teacher``: the dense teacher logits'
    shape ``[..., V_t]``, or the three tensors of a top-k teacher.
    """
    explicit = not all(isinstance(d, int) for d in teacher)
    if explicit:
        values, index, tail = teacher
        lead = tuple(values.shape[:-1])
        if tuple(index.shape) != tuple(values.shape) or tuple(tail.shape) != lead:
            raise ValueError(
                f"{name}: a top-k teacher needs log_probs and indices of one shape [B, T, k] and tail "
                f"mass [B, T]; got {tuple(values.shape)}, {tuple(index.shape)}, {tuple(tail.shape)}"
            )
        if index.dtype.is_floating_point:
            raise ValueError(f"{name}: top-k indices must be integers, got {index.dtype}")
    else:
        if len(teacher) < 2:
            raise ValueError(f"{name}: teacher logits must be [..., V] (e.g. [B, T, V]), got {teacher}")
        lead = teacher[:-1]
    _check_common(name, student_shape, lead, mask, temperature, chunk_tokens)
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"{name}: topk must be a positive integer or None, got {topk!r}")
    if explicit:
        vocab = common_vocab(student_shape[-1], student_shape[-1], vocab_size)
        if temperature != 1.0:
            raise ValueError(
                f"{name}: a top-k teacher holds log-probabilities at temperature 1 and a tail mass that "
                "cannot be re-tempered; use temperature=1.0"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= vocab):
            raise ValueError(
                f"{name}: the top-k teacher names token {int(index.max())}, outside the {vocab}-token vocabulary "
                "compared; set vocab_size to the real vocabulary"
            )
    else:
        vocab = common_vocab(student_shape[-1], teacher[-1], vocab_size)
    return _plan(vocab, chunk_tokens, lead, mask, device, temperature,
                 float(temperature) ** 2 if kl_family else 1.0, topk, "explicit" if explicit else "dense")


def _plan(vocab, chunk_tokens, lead, mask, device, temperature, scale, topk, mode) -> _Plan:
    rows, count = None, math.prod(lead)
    if mask is not None:
        flat = mask.reshape(-1) != 0
        rows = flat.nonzero().squeeze(1).to(device)
        count = int(rows.numel())
        if count == flat.numel():
            rows = None  # every position is scored: contiguous slices, no gathering
    return _Plan(vocab=vocab, chunk=chunk_tokens, rows=rows, count=count, temperature=float(temperature),
                 scale=scale, topk=topk, mode=mode)


def _apply(plan: _Plan, row_loss: RowLoss, student: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    inputs = [student, *parts]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ChunkedTokenLoss.apply(plan, row_loss, *inputs)
    value, _ = _evaluate(plan, row_loss, student, parts, [False] * len(inputs))
    return value


# ------------------------------------------------------------------------- registered losses
_COMMON = """
    Shapes, mask, reduction (mean over the scored positions), vocabulary truncation
    (``vocab_size``), chunking (``chunk_tokens``) and top-k teachers (``topk``) are described in
    :mod:`distill.losses.token_divergences`."""


def _example(generator: torch.Generator) -> dict:
    """Student and teacher logits ``[2, 5, 11]``, token ids ``[2, 5]``, and a mask that leaves out the
    last two positions of the second sequence (padding)."""
    student, teacher = (torch.randn(2, 5, 11, generator=generator) * 2 for _ in range(2))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, -2:] = False
    return {"student": student, "teacher": teacher, "labels": torch.randint(0, 11, (2, 5), generator=generator),
            "mask": mask}


@register_loss("token_fkl", inputs=("student", "teacher", "mask"), example=_example)
def token_fkl_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """Forward KL(p_t ‖ p_s) per token, × T²."""
    return token_divergence("token_fkl", forward_kl, student_logits, teacher_logits, mask, temperature=temperature,
                            chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_loss("token_rkl", inputs=("student", "teacher", "mask"), example=_example)
def token_rkl_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """Reverse KL(p_s ‖ p_t) per token, × T²."""
    return token_divergence("token_rkl", reverse_kl, student_logits, teacher_logits, mask, temperature=temperature,
                            chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_loss("token_gjsd", inputs=("student", "teacher", "mask"), example=_example)
def token_gjsd_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """GKD's generalised JSD per token, × T²:
    ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)``, ``m = β p_t + (1 − β) p_s`` (Agarwal et al. 2024).

    β = 0.5 is the ordinary Jensen-Shannon divergence. For 0 < β < 1 the formula itself tends to 0
    at both ends: ``JSD(β) ≈ β · KL(p_t ‖ p_s)`` as β → 0 and ``≈ (1 − β) · KL(p_s ‖ p_t)`` as β → 1
    (Huszár 2015), so it behaves like forward KL for small β and like reverse KL for β near 1, scaled
    down. The endpoints are defined as GKD's implementations do: β = 0 *is* forward KL(p_t ‖ p_s)
    and β = 1 *is* reverse KL(p_s ‖ p_t), at full scale (``token_fkl`` / ``token_rkl`` exactly). The
    value therefore jumps at the endpoints; compare runs at different β by their metrics, not by
    the loss's magnitude.
    """
    return token_divergence("token_gjsd", generalized_jsd(check_beta("token_gjsd", beta)), student_logits,
                            teacher_logits, mask, temperature=temperature, chunk_tokens=chunk_tokens,
                            vocab_size=vocab_size, topk=topk, kl_family=True)


@register_loss("token_tvd", inputs=("student", "teacher", "mask"), example=_example)
def token_tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """Total variation distance ½ Σ |p_t − p_s| per token, in [0, 1] (no T² factor)."""
    return token_divergence("token_tvd", total_variation, student_logits, teacher_logits, mask,
                            temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk,
                            kl_family=False)


def check_beta(name: str, beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta!r}")
    return float(beta)


def check_alpha(name: str, alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1) (alpha = 1 makes the divergence 0), got {alpha!r}")
    return float(alpha)


@register_loss("token_skl", inputs=("student", "teacher", "mask"), example=_example)
def token_skl_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew KL per token, × T²: ``KL(p_t ‖ α p_t + (1 − α) p_s)`` (Ko et al. 2024; their
    default α = 0.1). α = 0 is forward KL; mixing in the teacher bounds the log-ratio by
    ``−log α``, which keeps gradients finite where the student gives a teacher token no mass."""
    alpha = check_alpha("token_skl", alpha)
    return token_divergence("token_skl", skew_kl(alpha), student_logits, teacher_logits, mask,
                            temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk,
                            kl_family=True)


@register_loss("token_srkl", inputs=("student", "teacher", "mask"), example=_example)
def token_srkl_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL per token, × T²: ``KL(p_s ‖ (1 − α) p_t + α p_s)`` (Ko et al.
    2024). α = 0 is reverse KL."""
    alpha = check_alpha("token_srkl", alpha)
    return token_divergence("token_srkl", skew_reverse_kl(alpha), student_logits, teacher_logits, mask,
                            temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk,
                            kl_family=True)


@register_loss("token_ce", inputs=("student", "labels", "mask"), example=_example)
def token_ce_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy of ``[B, T, V]`` logits against ``[B, T]`` token ids, in nats per
    token: the mean over positions that the mask keeps and whose label is not ``ignore_index``.

    The hard-label term of a causal LM (``ce`` is for ``[B, C]`` classification logits); chunked
    like the divergences, and ``vocab_size`` cuts a padded vocabulary (a label beyond it raises).
    """
    plan = token_ce_plan("token_ce", tuple(student_logits.shape), labels, mask, student_logits.device,
                         chunk_tokens=chunk_tokens, vocab_size=vocab_size, ignore_index=ignore_index)
    return _apply(plan, lambda *_: None, student_logits, [labels])


def token_ce_plan(
    name: str,
    student_shape: tuple[int, ...],
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    device: torch.device,
    *,
    chunk_tokens: int,
    vocab_size: int | None,
    ignore_index: int,
) -> _Plan:
    """Check ``token_ce``'s arguments and plan its chunks from the shape of the student's logits."""
    lead = tuple(labels.shape)
    _check_common(name, student_shape, lead, mask, 1.0, chunk_tokens)
    if labels.dtype.is_floating_point:
        raise ValueError(f"{name}: labels must be integer token ids, got {labels.dtype}")
    vocab = common_vocab(student_shape[-1], student_shape[-1], vocab_size)
    keep = labels != ignore_index
    if mask is not None:
        keep = keep & (mask != 0)
    scored = labels[keep]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocab):
        bad = int(scored.max()) if int(scored.max()) >= vocab else int(scored.min())
        raise ValueError(f"{name}: label {bad} is outside the {vocab}-token vocabulary")
    return _plan(vocab, chunk_tokens, lead, keep, device, 1.0, 1.0, None, "labels")


for _fn in (token_fkl_loss, token_rkl_loss, token_gjsd_loss, token_tvd_loss, token_skl_loss, token_srkl_loss):
    _fn.__doc__ = (_fn.__doc__ or "") + "\n" + _COMMON
del _fn
