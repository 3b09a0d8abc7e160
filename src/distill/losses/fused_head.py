"""Token losses that take the output head instead of the logits, so no ``[tokens, vocab]`` logits exist.

A causal LM's logits are ``hidden @ weight.T + bias``. The losses of
:mod:`distill.losses.token_divergences` read those logits, so both models' ``[tokens, vocab]``
logits are built before the loss (at vocab 150k and 8k tokens, 4.9 GB per model in fp32) and the
student's get a gradient of the same size. The functions here take each model's final hidden
states and output layer (a :class:`Head`) instead and compute the logits inside the loss, a chunk
of positions at a time, in forward and backward alike, as Liger-Kernel's fused linear JSD does
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training").

**What a chunk does.** For ``chunk_tokens`` scored positions: the student's logits
``h @ W.T + b`` and the teacher's (from its head) in fp32; the loss and its gradient ``g`` with
respect to the student's logits, a piece of about ``PIECE_LOGITS`` logits (a few rows) at a time,
each piece's gradient written over its used-up logits (the row losses, vocabulary, mask,
temperature, T² and top-k rules of the token losses, the same code); then ``g @ W`` into the
gradient of the hidden states,
``g.T @ h`` added into the head weight's gradient and ``Σ g`` into the bias's. All of it happens in
the forward pass (when grad mode is on and the student needs a gradient); backward hands the
buffers on, scaled. Masked positions are not computed at all, nor are head rows beyond the
compared vocabulary (``vocab_size``; they get a zero gradient). The teacher gets no gradient.

**Values.** The same loss and gradients (hidden states, head weight, head bias) as the token loss of
``F.linear(hidden, weight, bias)`` and the teacher's logits, up to fp32 rounding. The matmuls run in
fp32: bf16 or fp16 inputs give the fp32 loss of the rounded inputs (the logits path rounds the
logits themselves to bf16 first), and gradients come back in each input's dtype.

**Memory.** Besides the inputs and their gradients (which any loss needs): the two models' fp32
logits of one chunk (``2 × chunk_tokens × V × 4`` bytes: 156 MB at V = 152k and the default 128
positions), one piece's fp32 temporaries of the row loss (about 12 × 4 MB for
``fused_token_gjsd``; tests/test_fused_head.py measures both), and, for a bf16 or fp16 head, an
fp32 copy of each head's compared rows and the fp32 accumulator of the student weight's gradient.
No ``[tokens, V]`` tensor is created, and nothing grows with the number of tokens but the hidden
states. Larger chunks make fewer, faster matrix products. Measured by
``python benchmarks/lm_scale.py fused`` (``benchmarks/results/lm_scale.md``).

**Teachers.** A :class:`Head` (a live teacher's final hidden states and output layer), a
:class:`~distill.losses.token_divergences.TopK` (e.g. from a top-k cache; temperature 1), or dense
logits ``[B, T, V_t]``. A plain 3-tuple means a top-k teacher, so a teacher head must be a ``Head``.

In a recipe, ``task_options.fused_head: true`` (causal LMs) feeds the models so that they stop
before their output layer and give a :class:`Head` as their logits; every ``token_*`` term then
runs its fused form here (each is registered as the fused form of its token loss), so a run never
builds either model's ``[tokens, vocab]`` logits in training.

    from distill.losses.fused_head import Head, fused_token_gjsd
    loss = fused_token_gjsd(Head(student_hidden, student.lm_head.weight),
                            Head(teacher_hidden, teacher.lm_head.weight), mask, beta=0.5)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from distill.losses.registry import register_fused
from distill.losses.token_divergences import (
    RowLoss,
    TopK,
    _chunk_rows,
    _flat,
    _Plan,
    check_alpha,
    check_beta,
    chunk_value_and_grad,
    divergence_plan,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    token_ce_plan,
    total_variation,
)
from distill.taps import Head

CHUNK_TOKENS = 128  # positions per chunk: the logits of both models, [128, V] fp32 each (78 MB at V = 152k)
PIECE_LOGITS = 2**20  # logits per piece the row loss runs on (4 MB in fp32; ~12 temporaries of that size)


def _check_head(name: str, side: str, head) -> None:
    if not isinstance(head, Head):
        raise TypeError(f"{name}: the {side} must be a Head(hidden, weight, bias=None), got {type(head).__name__}")
    hidden, weight, bias = head
    if hidden.dim() < 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: the {side}'s hidden states must be [..., H] and its head weight [V, H]; got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: the {side}'s head bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _logits_shape(head: Head) -> tuple[int, ...]:
    return (*head.hidden.shape[:-1], head.weight.shape[0])


def _linear32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden.float(), weight, bias)


def _compared_rows(head: Head, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's first ``vocab`` rows in fp32, without the autograd graph (a view when already fp32)."""
    weight = head.weight.detach()[:vocab].float()
    bias = None if head.bias is None else head.bias.detach()[:vocab].float()
    return weight, bias


TeacherRows = Callable[[torch.Tensor | slice], list[torch.Tensor]]


def _teacher_rows(plan: _Plan, teacher) -> TeacherRows:
    """What ``_chunk_rows`` reads of the teacher at the flat positions ``where``: its logits for a head
    (computed here, in fp32) or dense logits, the three tensors of a top-k teacher, or the labels."""
    if isinstance(teacher, Head):
        hidden = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
        weight, bias = _compared_rows(teacher, plan.vocab)
        return lambda where: [_linear32(hidden[where], weight, bias)]
    if plan.mode == "explicit":
        flat = [_flat(t.detach(), w) for t, w in zip(teacher, (teacher[0].shape[-1], teacher[1].shape[-1], None))]
    else:  # dense teacher logits, or labels
        flat = [_flat(teacher[0].detach(), plan.vocab if plan.mode == "dense" else None)]
    return lambda where: [t[where] for t in flat]


def _evaluate(
    plan: _Plan, row_loss: RowLoss, student: Head, teacher: TeacherRows, need: tuple[bool, bool, bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The mean loss over the scored positions, and the gradients of the student's hidden states,
    head weight and bias where ``need`` says (else None)."""
    vocab = plan.vocab
    hidden = student.hidden.detach()
    flat = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = _compared_rows(student, vocab)
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need[0] else None
    grad_hidden_flat = None if grad_hidden is None else grad_hidden.view(-1, hidden.shape[-1])
    # fp32 accumulators over the chunks, for the compared rows only; the rest of the head gets zeros
    acc_weight = torch.zeros_like(weight) if need[1] else None
    acc_bias = torch.zeros_like(bias) if need[2] and bias is not None else None
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    positions = 0 if plan.count == 0 else (plan.rows.numel() if plan.rows is not None else flat.shape[0])
    for start in range(0, positions, plan.chunk):
        where = (
            plan.rows[start:start + plan.chunk] if plan.rows is not None
            else slice(start, min(start + plan.chunk, positions))
        )
        with torch.no_grad():
            h = flat[where].float()
            logits = F.linear(h, weight, bias)
            t_rows = teacher(where)
        # the row loss runs on pieces of the chunk: its ~12 fp32 temporaries are piece-sized, while the
        # matrix products above and below keep the chunk's rows (fewer, larger products are faster)
        rows = logits.shape[0]
        piece = max(1, min(rows, PIECE_LOGITS // vocab))
        for i in range(0, rows, piece):
            s_piece, t_piece = logits[i:i + piece], [t[i:i + piece] for t in t_rows]
            if not any(need):
                with torch.no_grad():
                    total += _chunk_rows(plan, row_loss, s_piece, t_piece).sum().double() / plan.count
                continue
            part, piece_grad = chunk_value_and_grad(plan, row_loss, s_piece, t_piece)
            s_piece.copy_(piece_grad)  # these logits are used up: their gradient takes their place
            total += part.double()
            del part, piece_grad
        del t_rows, t_piece  # the teacher's logits of the chunk
        if not any(need):
            continue
        grad = logits
        if grad_hidden_flat is not None:
            chunk_grad = (grad @ weight).to(grad_hidden_flat.dtype)
            if isinstance(where, slice):
                grad_hidden_flat[where] = chunk_grad
            else:
                grad_hidden_flat.index_copy_(0, where, chunk_grad)
        if acc_weight is not None:
            acc_weight.addmm_(grad.T, h)
        if acc_bias is not None:
            acc_bias += grad.sum(0)
        del grad, logits, h
    return total.to(torch.float32), [grad_hidden, _full_rows(acc_weight, student.weight),
                                     _full_rows(acc_bias, student.bias)]


def _full_rows(acc: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of a head parameter ``like`` from the fp32 accumulator of its first rows."""
    if acc is None:
        return None
    if like.dtype == acc.dtype and like.shape[0] == acc.shape[0]:
        return acc
    full = torch.zeros_like(like, memory_format=torch.contiguous_format)
    full[:acc.shape[0]] = acc.to(like.dtype)
    return full


class _FusedHeadLoss(torch.autograd.Function):
    """The loss and the student's gradients from :func:`_evaluate` in forward; backward scales them."""

    @staticmethod
    def forward(ctx, plan: _Plan, row_loss: RowLoss, teacher: TeacherRows, hidden: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None):
        need = tuple(ctx.needs_input_grad[3:6])
        value, grads = _evaluate(plan, row_loss, Head(hidden, weight, bias), teacher, need)
        ctx.grads = grads
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = ctx.grads
        if float(grad_output) != 1.0:
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return (None, None, None, *grads)


def _apply(plan: _Plan, row_loss: RowLoss, student: Head, teacher) -> torch.Tensor:
    rows = _teacher_rows(plan, teacher)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        return _FusedHeadLoss.apply(plan, row_loss, rows, *student)
    value, _ = _evaluate(plan, row_loss, student, rows, (False, False, False))
    return value


# ------------------------------------------------------------------------- the common entry
def fused_token_divergence(
    name: str,
    row_loss: RowLoss,
    student: Head,
    teacher: Head | TopK | torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    chunk_tokens: int,
    vocab_size: int | None,
    topk: int | None,
    kl_family: bool,
) -> torch.Tensor:
    """:func:`~distill.losses.token_divergences.token_divergence` on the logits of ``student`` (a
    :class:`Head`) and ``teacher`` (a ``Head``, a top-k teacher or dense logits), computed chunk by
    chunk inside the loss (see the module docstring)."""
    _check_head(name, "student", student)
    if isinstance(teacher, Head):
        _check_head(name, "teacher", teacher)
        teacher_arg = _logits_shape(teacher)
    elif isinstance(teacher, torch.Tensor):
        teacher_arg = tuple(teacher.shape)
    elif isinstance(teacher, (tuple, list)) and len(teacher) == 3 and all(isinstance(t, torch.Tensor) for t in teacher):
        teacher_arg = teacher = list(teacher)
    else:
        raise TypeError(
            f"{name}: the teacher must be a Head(hidden, weight, bias=None), a top-k teacher (log_probs [B, T, k], "
            f"indices [B, T, k], tail_mass [B, T]) or logits [B, T, V], got {type(teacher).__name__}"
        )
    plan = divergence_plan(name, _logits_shape(student), teacher_arg, mask, student.hidden.device,
                           temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk,
                           kl_family=kl_family)
    return _apply(plan, row_loss, student, teacher if isinstance(teacher, (Head, list)) else [teacher])


# ------------------------------------------------------------------------- one function per loss
@register_fused("token_fkl")
def fused_token_fkl(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS, vocab_size: int | None = None,
                    topk: int | None = None) -> torch.Tensor:
    """``token_fkl`` (forward KL, × T²) from the models' heads; see the module docstring."""
    return fused_token_divergence("fused_token_fkl", forward_kl, student, teacher, mask, temperature=temperature,
                                  chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_fused("token_rkl")
def fused_token_rkl(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS, vocab_size: int | None = None,
                    topk: int | None = None) -> torch.Tensor:
    """``token_rkl`` (reverse KL, × T²) from the models' heads; see the module docstring."""
    return fused_token_divergence("fused_token_rkl", reverse_kl, student, teacher, mask, temperature=temperature,
                                  chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_fused("token_gjsd")
def fused_token_gjsd(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                     beta: float = 0.5, temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS,
                     vocab_size: int | None = None, topk: int | None = None) -> torch.Tensor:
    """``token_gjsd`` (GKD's generalised JSD, × T²) from the models' heads; see the module docstring."""
    row_loss = generalized_jsd(check_beta("fused_token_gjsd", beta))
    return fused_token_divergence("fused_token_gjsd", row_loss, student, teacher, mask, temperature=temperature,
                                  chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_fused("token_tvd")
def fused_token_tvd(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS, vocab_size: int | None = None,
                    topk: int | None = None) -> torch.Tensor:
    """``token_tvd`` (total variation, no T²) from the models' heads; see the module docstring."""
    return fused_token_divergence("fused_token_tvd", total_variation, student, teacher, mask,
                                  temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size,
                                  topk=topk, kl_family=False)


@register_fused("token_skl")
def fused_token_skl(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                    alpha: float = 0.1, temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS,
                    vocab_size: int | None = None, topk: int | None = None) -> torch.Tensor:
    """``token_skl`` (DistiLLM's skew KL, × T²) from the models' heads; see the module docstring."""
    row_loss = skew_kl(check_alpha("fused_token_skl", alpha))
    return fused_token_divergence("fused_token_skl", row_loss, student, teacher, mask, temperature=temperature,
                                  chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_fused("token_srkl")
def fused_token_srkl(student: Head, teacher: Head | TopK | torch.Tensor, mask: torch.Tensor | None = None,
                     alpha: float = 0.1, temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS,
                     vocab_size: int | None = None, topk: int | None = None) -> torch.Tensor:
    """``token_srkl`` (DistiLLM's skew reverse KL, × T²) from the models' heads; see the module docstring."""
    row_loss = skew_reverse_kl(check_alpha("fused_token_srkl", alpha))
    return fused_token_divergence("fused_token_srkl", row_loss, student, teacher, mask, temperature=temperature,
                                  chunk_tokens=chunk_tokens, vocab_size=vocab_size, topk=topk, kl_family=True)


@register_fused("token_ce")
def fused_token_ce(student: Head, labels: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk_tokens: int = CHUNK_TOKENS, vocab_size: int | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """``token_ce`` (next-token cross-entropy on ``[B, T]`` token ids, nats per scored token) from the
    student's head; see the module docstring."""
    name = "fused_token_ce"
    _check_head(name, "student", student)
    plan = token_ce_plan(name, _logits_shape(student), labels, mask, student.hidden.device,
                         chunk_tokens=chunk_tokens, vocab_size=vocab_size, ignore_index=ignore_index)
    return _apply(plan, lambda *_: None, student, [labels])
