"""Causal language modelling: sampling, on-policy batches, sequence-level KD and the metrics.

A batch is ``{"input": [B, T] token ids, "target": [B, T] next tokens, "index": [B]}`` (as
:class:`~distill.data.BatchLoader` gives :mod:`distill.data.tinyshakespeare` blocks; ids may be
float32, models cast them), optionally with ``"mask"`` or ``"attention_mask"`` (see
:func:`distill.objective.token_mask`). Models map ``[B, T]`` ids to ``[B, T, V]`` logits, so the
classification feed works unchanged and the token losses (``token_fkl``, ``token_rkl``,
``token_gjsd``, ``token_tvd``, ``token_skl``, ``token_srkl``, ``token_ce``) read the logits directly:

    distiller = Distiller(student, teacher, [Term("kd", "token_gjsd", params={"beta": 0.5})])
    trainer = Trainer(distiller, loader, config,
                      batch_transform=OnPolicyTransform(student, lam=0.5, max_new_tokens=32))

Generalised KD (GKD; Agarwal et al. 2024): :class:`OnPolicyTransform` replaces a fraction λ of the
batches by sequences the student samples from prompts taken from the batch; the live teacher then
scores those sequences like any other batch, so neither the trainer nor the objective changes.
Sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"):
:func:`sequence_kd_dataset` lets the teacher write continuations of a prompt set once; the student
then trains on them with plain cross-entropy (``token_ce``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from distill.data.types import ArrayDataset
from distill.errors import DistillError
from distill.signals import Batch, default_feed

feed = default_feed


# ------------------------------------------------------------------------------ sampling
def _context_limit(model: nn.Module) -> int | None:
    limit = getattr(model, "block_size", None)
    return int(limit) if isinstance(limit, int) else None


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``prompt`` int64 ``[B, P]`` followed by ``max_new_tokens`` sampled tokens: ``[B, P + n]``.

    Each step feeds the last ``model.block_size`` tokens (all of them when the model has no such
    attribute) and samples from ``softmax(logits[:, -1] / temperature)``; ``temperature=0`` takes
    the most probable token (greedy). ``vocab_size`` restricts sampling to the first ``vocab_size``
    logits (a padded vocabulary's extra entries are never sampled). Sampling draws from
    ``generator`` (CPU), so a seeded generator gives the same tokens. The model runs in eval mode
    and is put back in the mode it was in. Models with ``supports_cache`` (the zoo's ``gpt``) keep
    their keys and values between steps while the sequence fits ``block_size``; others rerun the
    context each step.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise DistillError(f"generate: prompt must be [B, P] token ids with P >= 1, got {tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DistillError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise DistillError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    was_training = model.training
    model.eval()
    limit = _context_limit(model)
    tokens = prompt.long()
    # a model that keeps keys and values (the zoo's gpt) decodes one position per step, as long as
    # the whole sequence fits its context; others rerun the (cropped) context every step
    cached = getattr(model, "supports_cache", False) and limit is not None and (
        tokens.shape[1] + max_new_tokens - 1 <= limit)
    cache: list = []
    try:
        for step in range(max_new_tokens):
            if cached:
                logits = model(tokens if step == 0 else tokens[:, -1:], cache=cache)[:, -1].float()
            else:
                context = tokens if limit is None else tokens[:, -limit:]
                logits = model(context)[:, -1].float()
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
            tokens = torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokens


# ------------------------------------------------------------------------------ GKD on-policy batches
class OnPolicyTransform:
    """A batch transform that, with probability ``lam``, makes the batch student-generated (GKD).

    The prompt is each sequence's first ``prompt_tokens`` tokens (default: ``T − max_new_tokens``,
    so the sequence keeps its length ``T``); the student continues it by ``max_new_tokens`` tokens
    sampled at ``temperature`` with the trainer's per-step ``generator``, so a resumed run draws the
    same batches. The new batch is ``{"input": prompt + sample, "mask": ...}`` with the mask on the
    positions whose next token the student sampled (GKD scores the student's own tokens); the labels,
    sample index and view are dropped, since they describe the data set's sequence, not this one.
    The teacher therefore has to run live: a teacher cache cannot score new sequences, and terms
    reading labels (``token_ce``) fail on these batches. Other batches (probability ``1 − lam``)
    pass through unchanged. ``last_on_policy`` records the latest decision, ``on_policy_batches``
    and ``batches`` the running counts.
    """

    def __init__(
        self,
        student: nn.Module,
        lam: float = 0.5,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        prompt_tokens: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise DistillError(f"OnPolicyTransform: lam must be in [0, 1], got {lam!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DistillError(f"OnPolicyTransform: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)
                                          or prompt_tokens < 1):
            raise DistillError(f"OnPolicyTransform: prompt_tokens must be a positive integer, got {prompt_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise DistillError(f"OnPolicyTransform: temperature must be >= 0, got {temperature!r}")
        self.student = student
        self.lam = float(lam)
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.prompt_tokens = prompt_tokens
        self.vocab_size = vocab_size
        self.last_on_policy = False
        self.on_policy_batches = 0
        self.batches = 0

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        self.batches += 1
        # one draw per batch, always taken, so that the generator's later draws do not depend on lam
        self.last_on_policy = bool(torch.rand((), generator=generator) < self.lam)
        if not self.last_on_policy:
            return batch
        self.on_policy_batches += 1
        tokens = batch["input"]
        if tokens.dim() != 2:
            raise DistillError(f"OnPolicyTransform: batch['input'] must be [B, T] token ids, got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        prompt_len = self.prompt_tokens if self.prompt_tokens is not None else length - self.max_new_tokens
        if prompt_len < 1 or prompt_len > length:
            raise DistillError(
                f"OnPolicyTransform: sequences of {length} tokens leave no prompt before {self.max_new_tokens} "
                "new tokens; lower max_new_tokens or set prompt_tokens"
            )
        sequence = generate(self.student, tokens[:, :prompt_len].long(), self.max_new_tokens, self.temperature,
                            generator, self.vocab_size)
        mask = torch.zeros(sequence.shape, dtype=torch.bool, device=sequence.device)
        # logits[:, t] predict token t + 1: positions prompt_len - 1 .. end - 2 score the sampled tokens
        mask[:, prompt_len - 1:-1] = True
        dropped = {"input", "target", "index", "view", "mask", "attention_mask"}
        return {**{k: v for k, v in batch.items() if k not in dropped},
                "input": sequence.to(tokens.dtype), "mask": mask}


# ------------------------------------------------------------------------------ sequence-level KD
@torch.no_grad()
def sequence_kd_dataset(
    teacher: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    vocab_size: int | None = None,
) -> ArrayDataset:
    """The teacher's continuations of ``prompts`` (int ``[N, P]``) as a next-token data set.

    Each prompt is continued by ``max_new_tokens`` tokens (``temperature=0``: greedy, the
    approximation of the teacher's mode that Kim & Rush's beam search targets; otherwise sampled,
    seeded by ``seed``). The sequences ``s`` ``[N, P + n]`` become ``inputs = s[:, :-1]`` and
    ``targets = s[:, 1:]`` (int64 ``[N, P + n − 1]``), ready for a :class:`BatchLoader` and
    ``token_ce``; the targets over the prompt are the prompt's own tokens. Done once, before
    training: the teacher is not needed afterwards.
    """
    if prompts.dim() != 2:
        raise DistillError(f"sequence_kd_dataset: prompts must be [N, P] token ids, got {tuple(prompts.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    pieces = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size].long().to(device)
        pieces.append(generate(teacher, chunk, max_new_tokens, temperature, generator, vocab_size).cpu())
    sequences = torch.cat(pieces) if pieces else prompts.long().new_zeros((0, prompts.shape[1] + max_new_tokens))
    return ArrayDataset(sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous())


# ------------------------------------------------------------------------------ metrics
@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batches: Iterable[Batch],
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Next-token metrics over every position of ``batches`` (``{"input", "target"}`` dicts).

    ``loss``: mean cross-entropy in nats per token; ``perplexity``: ``exp(loss)``; ``accuracy``:
    top-1 next-token accuracy; with ``teacher``, ``agreement``: the fraction of positions where
    student and teacher predict the same next token (top-1), and ``kl_to_teacher``: mean
    KL(p_t ‖ p_s) per token at T = 1. ``vocab_size`` cuts padded logits first.
    """
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.eval()
    total = {"nll": 0.0, "correct": 0.0, "agree": 0.0, "kl": 0.0}
    count = 0
    try:
        for batch in batches:
            logits = model(batch["input"]).float()
            width = vocab_size or logits.shape[-1]
            log_s = torch.log_softmax(logits[..., :width], dim=-1).reshape(-1, width)
            target = batch["target"].long().reshape(-1)
            total["nll"] += float(-log_s.gather(1, target[:, None]).sum())
            predicted = log_s.argmax(-1)
            total["correct"] += float((predicted == target).sum())
            if teacher is not None:
                log_t = torch.log_softmax(teacher(batch["input"]).float()[..., :width], dim=-1).reshape(-1, width)
                total["agree"] += float((log_t.argmax(-1) == predicted).sum())
                total["kl"] += float((log_t.exp() * (log_t - log_s)).sum())
            count += target.numel()
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    if count == 0:
        raise DistillError("evaluate_lm: no tokens to evaluate")
    loss = total["nll"] / count
    out = {"loss": loss, "perplexity": math.exp(loss), "accuracy": total["correct"] / count}
    if teacher is not None:
        out["agreement"] = total["agree"] / count
        out["kl_to_teacher"] = total["kl"] / count
    return out


@torch.no_grad()
def sample_teacher_nll(
    model: nn.Module,
    teacher: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    vocab_size: int | None = None,
) -> float:
    """How teacher-like ``model``'s own text is: the teacher's mean negative log-likelihood (nats per
    token) of the ``max_new_tokens`` tokens ``model`` samples after each of ``prompts`` (int ``[N, P]``).

    Lower is better. Teacher-forced metrics (perplexity, agreement) score the student on real
    prefixes only; this one scores the sequences it writes, where on-policy and mode-seeking
    training aim to help. The teacher's own samples give its entropy rate, the value a perfect
    copy of the teacher reaches at ``temperature=1``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    teacher_was_training = teacher.training
    teacher.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            prompt = prompts[start:start + batch_size].long()
            sequence = generate(model, prompt, max_new_tokens, temperature, generator, vocab_size)
            logits = teacher(sequence[:, :-1]).float()
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            log_t = torch.log_softmax(logits[:, prompt.shape[1] - 1:], dim=-1)
            sampled = sequence[:, prompt.shape[1]:]
            total += float(-log_t.gather(-1, sampled.unsqueeze(-1)).sum())
            count += sampled.numel()
    finally:
        teacher.train(teacher_was_training)
    if count == 0:
        raise DistillError("sample_teacher_nll: no prompts or no new tokens")
    return total / count

