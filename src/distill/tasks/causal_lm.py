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

In a recipe (``task: causal-lm``, :class:`CausalLMTask`): data ``tinyshakespeare`` or ``text`` (a
text file of your own, cut the same way), models ``gpt`` or ``hf``; ``task_options.on_policy`` is
GKD's λ (an :class:`OnPolicyTransform` in every distilled stage) and ``task_options.sequence_kd``
trains the distilled stages on the teacher's continuations (:class:`TeacherSequences`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from distill.data.types import ArrayDataset
from distill.data.splits import random_split, training_subset
from distill.errors import DistillError
from distill.signals import Batch, default_feed
from distill.taps import Head, output_tensor

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
    their keys and values between steps while the sequence fits ``block_size``, and so do Hugging
    Face causal LMs (``cache`` or ``past_key_values``; those cannot crop, so the sequence must fit them); others
    rerun the context each step.
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
    hf_cache = None if cached else _cache_argument(model)
    past = None
    try:
        for step in range(max_new_tokens):
            if cached:
                logits = model(tokens if step == 0 else tokens[:, -1:], cache=cache)[:, -1].float()
            elif hf_cache:
                out = model(input_ids=tokens if past is None else tokens[:, -1:], use_cache=True, **{hf_cache: past})
                past = getattr(out, hf_cache)
                logits = out.logits[:, -1].float()
            else:
                context = tokens if limit is None else tokens[:, -limit:]
                logits = output_tensor(model(context))[:, -1].float()  # a tensor, or HF's output
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


def _cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model`` takes and returns its keys and values: ``cache``
    (transformers 5) or ``past_key_values`` (earlier), for a Hugging Face causal LM called directly
    or through a wrapper that passes keywords on to it (:class:`distill.nlp.HFModel`); ``None`` for
    any other model."""
    import inspect

    def cache_name(module: nn.Module) -> str | None:
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return None
        if "use_cache" not in params:
            return None
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    if not hasattr(model, "config"):
        return None
    own = cache_name(model)
    if own is not None:
        return own
    inner = getattr(model, "model", None)
    params = inspect.signature(model.forward).parameters
    passes_on = "input_ids" in params and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return cache_name(inner) if passes_on and isinstance(inner, nn.Module) else None


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



# ------------------------------------------------------------------------------ sequence-level KD as batches
class TeacherSequences:
    """A batch transform for sequence-level KD (Kim & Rush 2016) inside a run: every training block
    is replaced by the teacher's continuation of its first ``prompt_tokens`` tokens.

    The teacher writes the continuations of the training set in chunks of ``chunk`` consecutive
    blocks, each the first time one of its blocks is drawn, by :func:`sequence_kd_dataset` (sampled
    at ``temperature``, chunk ``c`` from seed ``(seed, c)``; ``0``: greedy), and keeps them: every
    epoch replays the same teacher text, as in a data set the teacher wrote once, and the text does
    not depend on the order blocks are drawn in (a resumed run gets the same). Blocks are looked up
    by ``batch["index"]``; inputs and targets keep the blocks' length ``T`` (the continuation is
    ``T + 1 − prompt_tokens`` tokens). The student then trains with ``token_ce`` on the teacher's
    tokens (or any term: the teacher scores its own text).
    """

    def __init__(self, teacher: nn.Module, dataset: ArrayDataset, prompt_tokens: int = 16,
                 temperature: float = 1.0, seed: int = 0, chunk: int = 64,
                 vocab_size: int | None = None) -> None:
        length = dataset.inputs.shape[1]
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or not 1 <= prompt_tokens <= length:
            raise DistillError(f"sequence-level KD: prompt_tokens must be an integer in [1, {length}] "
                               f"(the block length), got {prompt_tokens!r}")
        self.teacher = teacher
        self.dataset = dataset
        self.prompt_tokens = prompt_tokens
        self.temperature = temperature
        self.seed = int(seed)
        self.chunk = chunk
        self.vocab_size = vocab_size
        self.inputs = torch.zeros(dataset.inputs.shape, dtype=torch.long)
        self.targets = torch.zeros(dataset.inputs.shape, dtype=torch.long)
        self.written = torch.zeros(math.ceil(len(dataset) / chunk), dtype=torch.bool)

    def write(self, index: torch.Tensor) -> None:
        """Have the teacher write the chunks holding blocks ``index`` (int64 ``[b]``), once."""
        length = self.dataset.inputs.shape[1]
        for c in torch.unique(index // self.chunk).tolist():
            if self.written[c]:
                continue
            rows = slice(c * self.chunk, (c + 1) * self.chunk)
            prompts = self.dataset.inputs[rows, : self.prompt_tokens].long()
            part = sequence_kd_dataset(self.teacher, prompts, length + 1 - self.prompt_tokens, self.temperature,
                                       batch_size=self.chunk, seed=self.seed * 1_000_003 + c,
                                       vocab_size=self.vocab_size)
            self.inputs[rows], self.targets[rows] = part.inputs, part.targets
            self.written[c] = True

    def load(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Take the whole text from a cache (:meth:`write` then has nothing left to write)."""
        if tuple(inputs.shape) != tuple(self.inputs.shape) or tuple(targets.shape) != tuple(self.targets.shape):
            raise DistillError(f"the cached teacher text holds {tuple(inputs.shape)} blocks, the training set "
                               f"{tuple(self.inputs.shape)}; rebuild it with `distill cache`")
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.written[:] = True

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        index = batch["index"].long().cpu()
        self.write(index)
        inputs = self.inputs[index].to(batch["input"].device, batch["input"].dtype)
        targets = self.targets[index].to(batch["target"].device, batch["target"].dtype)
        return {**batch, "input": inputs, "target": targets}


# ------------------------------------------------------------------------------ the task
from pydantic import Field, field_validator, model_validator  # noqa: E402

from distill.tasks.base import TASKS, Task, TaskOptions  # noqa: E402

class LMOptions(TaskOptions):
    """``task_options`` of causal-lm."""

    on_policy: float = 0.0  # GKD's λ: the fraction of distilled batches the student writes
    new_tokens: int = Field(32, ge=1)  # tokens the student samples per on-policy sequence
    temperature: float = Field(1.0, gt=0)  # sampling temperature of on-policy and sequence-level KD text
    sequence_kd: bool = False  # distilled stages train on the teacher's continuations of the blocks
    sequence_kd_prompt_tokens: int = Field(16, ge=1)  # the prompt the teacher continues
    fused_head: bool = False  # training stages never build [B, T, V] logits: token losses on the output heads

    @field_validator("on_policy", mode="before")
    @classmethod
    def _lam(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"on_policy (GKD's λ) must be in [0, 1], got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_writer(self):
        if self.on_policy and self.sequence_kd:
            raise ValueError("choose on_policy (the student writes) or sequence_kd (the teacher writes), not both")
        return self


HF_KWARGS = ("name_or_path", "config")


def token_feed(model: nn.Module, batch: Batch) -> object:
    """``model(batch["input"])`` with the ids as int64 ``[B, T]`` (Hugging Face models need them so)."""
    return model(batch["input"].long())


def output_layer(model: nn.Module) -> nn.Linear:
    """The layer that turns a causal LM's final hidden states into logits: ``get_output_embeddings()``
    of a Hugging Face model (or of the one a wrapper holds as ``.model``), ``head`` of the zoo's ``gpt``."""
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper's model
    for candidate in (inner, getattr(inner, "model", None)):
        get = getattr(candidate, "get_output_embeddings", None)
        layer = get() if callable(get) else None
        if isinstance(layer, nn.Linear):
            return layer
    layer = getattr(inner, "head", None)
    if isinstance(layer, nn.Linear):
        return layer
    raise DistillError(f"task_options.fused_head: cannot find the output layer of {type(model).__name__} (a Hugging "
                       "Face causal LM's get_output_embeddings(), or a Linear named 'head')")


def fused_token_feed(model: nn.Module, batch: Batch) -> Head:
    """:func:`token_feed` that stops before the output layer: the model runs with that layer giving an
    empty ``[..., 0]`` tensor, and the feed returns a :class:`~distill.taps.Head` of the hidden states
    it received and its weight and bias, so the ``[B, T, V]`` logits are never built (the token
    losses compute them chunk by chunk, :mod:`distill.losses.fused_head`)."""
    layer = output_layer(model)
    seen: list[torch.Tensor] = []

    def stop(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    layer.forward = stop  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        token_feed(model, batch)
    finally:
        del layer.forward
    if len(seen) != 1:
        raise DistillError(f"task_options.fused_head: the output layer of {type(model).__name__} ran {len(seen)} "
                           "times in one forward pass; use the plain feed (fused_head: false)")
    return Head(seen[0], layer.weight, layer.bias)


@dataclass
class PreparedLM:
    """Token blocks of a causal-LM run: ``train`` / ``val`` / ``test`` :class:`ArrayDataset`s and loaders."""

    data: object  # DataSplits
    train: ArrayDataset
    val: ArrayDataset | None
    test_loader: object
    val_loader: object | None
    vocab_size: int


def _teacher_model(teacher) -> nn.Module:
    """The model behind a teacher signal (a live teacher) for generating text."""
    if isinstance(teacher, nn.Module):
        return teacher
    model = getattr(teacher, "model", None)
    if not isinstance(model, nn.Module):
        raise DistillError("sequence-level KD needs the live teacher to write text; drop teacher.cache")
    return model


@TASKS.register("causal-lm")
class CausalLMTask(Task):
    """Next-token prediction on token blocks: token accuracy (primary), perplexity, agreement with
    the teacher's next token, KL(teacher ‖ student) per token.

    Models: the zoo's ``gpt`` (any zoo model mapping ``[B, T]`` ids to ``[B, T, V]`` logits) and
    ``hf`` causal LMs, ``kwargs: {name_or_path: ...}`` or ``kwargs: {config: {model_type: gpt2, ...}}``
    (``vocab_size`` defaults to the data's vocabulary). ``task_options``: ``on_policy`` (GKD's λ,
    :class:`OnPolicyTransform` in every distilled stage), ``new_tokens``, ``temperature``,
    ``sequence_kd`` (:class:`TeacherSequences`), ``sequence_kd_prompt_tokens``.
    """

    name = "causal-lm"
    primary_metric = "accuracy"
    label_term = {"name": "ce", "loss": "token_ce"}
    report_metrics = ("perplexity",)
    feed = staticmethod(token_feed)
    teacher_cache = "tokens"
    Options = LMOptions

    def validate(self, recipe) -> None:
        from distill.losses import get_loss

        options = self.options(recipe)
        lam = options.on_policy
        if lam:
            readers = [t.name for t in recipe.distill.terms if "labels" in get_loss(t.loss).inputs and t.weight]
            if readers:
                raise DistillError(
                    f"task_options.on_policy is {lam}, but distill terms {', '.join(readers)} read labels, which "
                    "on-policy batches (the student's own text) do not have; use teacher terms only "
                    "(token_fkl, token_rkl, token_gjsd, ...)"
                )
        if recipe.teacher.cache is not None and lam:
            raise DistillError("teacher.cache replays the teacher on the training blocks, but task_options.on_policy "
                               "(the student writes the text) trains on new text; drop teacher.cache")
        stages = [recipe.train, *(s.train for s in (recipe.baseline, recipe.distill) if s.train is not None)]
        if options.fused_head and any(t.sharding == "fsdp" for t in stages):
            raise DistillError("task_options.fused_head reads the output layer's whole weight after the forward pass, "
                               "which FSDP has sharded again by then; use one of fused_head and train.sharding: fsdp")
        for role, spec in (("teacher", recipe.teacher), ("student", recipe.student),
                           *((f"assistants.{i}", a) for i, a in enumerate(recipe.assistants))):
            self._check_spec(spec, role)

    @staticmethod
    def _check_spec(spec, role: str) -> None:
        if spec.model == "hf":
            unknown = sorted(set(spec.kwargs) - set(HF_KWARGS))
            if unknown:
                raise DistillError(f"{role}.kwargs: model 'hf' has no option {', '.join(unknown)}; "
                                   f"accepted: {', '.join(HF_KWARGS)}")
            if ("name_or_path" in spec.kwargs) == ("config" in spec.kwargs):
                raise DistillError(f"{role} (model: hf) needs exactly one of kwargs.name_or_path and kwargs.config")
            return
        from distill.models import MODELS

        if ":" not in spec.model and spec.model not in MODELS:
            raise DistillError(f"unknown model '{spec.model}' for task causal-lm; choose gpt (or another zoo "
                               "model that maps token ids to next-token logits) or hf")

    def prepare(self, recipe, data_dir) -> PreparedLM:
        from distill.data import BatchLoader, load_dataset

        spec = recipe.data
        data = load_dataset(spec.name, data_dir, **spec.options)
        if data.train.inputs.dim() != 2 or data.train.targets.dim() != 2:
            raise DistillError(f"data set '{spec.name}' is not a next-token data set ([N, T] inputs and targets); "
                               "use tinyshakespeare or text")
        train = training_subset(data.train, spec.train_subset, spec.seed, keep_order=True)
        val = None
        if spec.val_fraction > 0:
            train, val = random_split(train, spec.val_fraction, spec.seed, "blocks")
        # logits of one evaluation batch are [b, T, V] floats: keep them within about 64 MiB
        length = data.train.inputs.shape[1]
        batch = max(1, min(spec.eval_batch_size, (1 << 24) // max(1, length * data.num_classes)))
        test_loader = BatchLoader(data.test, batch, shuffle=False)
        val_loader = BatchLoader(val, batch, shuffle=False) if val is not None else None
        return PreparedLM(data, train, val, test_loader, val_loader, data.num_classes)

    def describe(self, prepared: PreparedLM) -> str:
        length = prepared.train.inputs.shape[1]
        return (f"{prepared.data.name}: {len(prepared.train)} training blocks of {length} tokens"
                + (f", {len(prepared.val)} validation" if prepared.val is not None else "")
                + f", {len(prepared.data.test)} held-out; vocabulary {prepared.vocab_size}")

    def train_loader(self, recipe, prepared: PreparedLM, batch_size: int, seed: int, labelled_only: bool = False):
        from distill.data import BatchLoader

        return BatchLoader(prepared.train, batch_size, shuffle=True, seed=seed,
                           drop_last=len(prepared.train) > batch_size)

    def cache_batches(self, recipe, prepared: PreparedLM, batch_size: int):
        from distill.data import BatchLoader

        return BatchLoader(prepared.train, batch_size, shuffle=False)

    def cache_fingerprint(self, recipe, prepared: PreparedLM, teacher: nn.Module) -> dict:
        import hashlib
        from pathlib import Path

        train = prepared.train
        data = hashlib.sha256()
        for tensor in (train.inputs, train.targets):
            data.update(f"{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
            data.update(tensor.contiguous().numpy().tobytes())
        extra = prepared.data.extra or {}
        tokenizer = {"tokenizer": extra.get("tokenizer"), "vocab": extra.get("vocab")}
        folder = extra.get("tokenizer_path")
        if folder is not None:  # a BPE tokenizer: the digests of its files
            files = sorted(p for p in Path(folder).expanduser().iterdir() if p.is_file())
            tokenizer["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        parts = {"data": data.digest(), "tokenizer": tokenizer, "vocab": prepared.vocab_size}
        options = self.options(recipe)
        if options.sequence_kd:  # the teacher's text also depends on how it was sampled
            parts["extra"] = {"sequence_kd": {"prompt_tokens": options.sequence_kd_prompt_tokens,
                                              "temperature": options.temperature, "seed": recipe.data.seed}}
        return parts

    def tokenizer_of(self, model: nn.Module, prepared: PreparedLM):
        """GPT-2's BPE tokenizer (``transformers.GPT2TokenizerFast``) for data tokenised with it, saved
        beside a Hugging Face student's ``hf/`` folder; character vocabularies have none."""
        folder = (prepared.data.extra or {}).get("tokenizer_path")
        if folder is None:
            return None
        from pathlib import Path

        from distill.nlp.hf import require_transformers

        folder = Path(folder).expanduser()
        return require_transformers().GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))

    def build_model(self, spec, prepared: PreparedLM, seed: int) -> nn.Module:
        self._check_spec(spec, "model")
        if spec.model != "hf":
            from distill.tasks.classification import build_model

            return build_model(spec, prepared.data, seed)
        from distill.nlp.hf import from_config, load_pretrained

        length = prepared.train.inputs.shape[1]
        torch.manual_seed(seed)
        if "name_or_path" in spec.kwargs:
            model, _ = load_pretrained(spec.kwargs["name_or_path"], task="causal-lm")
        else:
            config = dict(spec.kwargs["config"])
            config.setdefault("vocab_size", prepared.vocab_size)
            for special in ("bos_token_id", "eos_token_id"):  # defaults such as GPT-2's 50256 lie outside
                config.setdefault(special, None)              # a small vocabulary; generation here needs none
            model = from_config(config, task="causal-lm", seed=seed)
        vocab = int(getattr(model.config, "vocab_size", prepared.vocab_size))
        if vocab < prepared.vocab_size:
            raise DistillError(f"model 'hf' has a vocabulary of {vocab} tokens but the data {prepared.vocab_size}")
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if positions is not None and int(positions) < length:
            raise DistillError(f"model 'hf' takes {positions} positions but the data's blocks are {length} tokens; "
                               "raise the config's n_positions / max_position_embeddings or lower block_size")
        model.block_size = length  # generation crops its context to what the model was trained on
        if spec.weights is not None:
            from distill.models import load_weights

            load_weights(model, spec.weights)
        return model

    def check_models(self, teacher: nn.Module, student: nn.Module, prepared: PreparedLM) -> None:
        from distill.taps import output_tensor

        x = prepared.data.test.inputs[:2].long()
        modes = teacher.training, student.training
        teacher.eval(), student.eval()
        with torch.no_grad():
            t, s = output_tensor(token_feed(teacher, {"input": x})), output_tensor(token_feed(student, {"input": x}))
        teacher.train(modes[0]), student.train(modes[1])
        for who, out in (("teacher", t), ("student", s)):
            if out.dim() != 3 or out.shape[:2] != x.shape:
                raise DistillError(f"the {who} maps [B, T] token ids to {list(out.shape)}, not next-token logits "
                                   f"[B, T, V]; use a causal LM (gpt, or hf)")
            if out.shape[-1] < prepared.vocab_size:
                raise DistillError(f"the {who} predicts {out.shape[-1]} tokens but the vocabulary has "
                                   f"{prepared.vocab_size}")

    def reference(self, teacher: nn.Module, prepared: PreparedLM) -> nn.Module:
        return teacher  # agreement and KL need its next-token distribution at every position

    def evaluate(self, model, prepared: PreparedLM, reference=None, split: str = "test") -> dict[str, float]:
        loader = prepared.test_loader if split == "test" else prepared.val_loader
        batches = ({"input": b["input"].long(), "target": b["target"]} for b in loader)
        teacher = reference if split == "test" else None
        return evaluate_lm(_LongIds(model), batches, _LongIds(teacher) if teacher is not None else None,
                           prepared.vocab_size)

    def latency_input(self, prepared: PreparedLM) -> torch.Tensor:
        return prepared.data.test.inputs[:1].long()

    def example_inputs(self, prepared: PreparedLM, n: int) -> torch.Tensor:
        """The first ``n`` test blocks, int64 token ids ``[n, T]`` (an export's parity check)."""
        return prepared.data.test.inputs[:max(n, 1)].long()

    def batch_transform(self, recipe, prepared: PreparedLM, student: nn.Module, teacher):
        if teacher is None:
            return None
        options = self.options(recipe)
        if options.sequence_kd:
            model = _teacher_model(teacher)
            stored = getattr(teacher, "sequences", None)  # the text it wrote, from a cache (TeacherText)
            cache = self.__dict__.setdefault("_written", {})  # one teacher text per teacher and data
            key = (id(model), id(prepared), id(stored))
            if key not in cache:
                cache[key] = self._sequences(recipe, prepared, model)
                if stored is not None:
                    cache[key].load(stored.inputs, stored.targets)
            return cache[key]
        if options.on_policy:
            return OnPolicyTransform(student, lam=float(options.on_policy), max_new_tokens=options.new_tokens,
                                     temperature=options.temperature, vocab_size=prepared.vocab_size)
        return None


    def training_feed(self, recipe):
        return fused_token_feed if self.options(recipe).fused_head else token_feed

    def cache_kind(self, recipe) -> str | None:
        return "sequences" if self.options(recipe).sequence_kd else self.teacher_cache

    def cache_sequences(self, recipe, prepared: PreparedLM, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training block's continuation by the teacher, written as a run writes them (same
        chunks and seeds), so a run reading them trains on the text it would have written itself."""
        sequences = self._sequences(recipe, prepared, _teacher_model(teacher))
        sequences.write(torch.arange(len(prepared.train)))
        return sequences.inputs, sequences.targets

    def _sequences(self, recipe, prepared: PreparedLM, model: nn.Module) -> TeacherSequences:
        options = self.options(recipe)
        return TeacherSequences(model, prepared.train, options.sequence_kd_prompt_tokens, options.temperature,
                                seed=recipe.data.seed, vocab_size=prepared.vocab_size)


class _LongIds(nn.Module):
    """Calls the model with int64 ids (evaluate_lm passes the batch's ids as they come)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # evaluate_lm puts the wrapper back in this mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from distill.taps import output_tensor

        return output_tensor(self.model(ids.long()))
