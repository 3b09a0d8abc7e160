"""Benchmark: distill against TRL's ``GKDTrainer`` (generalised KD, Agarwal et al. 2024), the peer
implementation, on the same tiny Hugging Face causal LMs and the same Tiny Shakespeare batches.

    python benchmarks/trl_parity.py [--steps 200] [--repeats 3] [--quick] [--out benchmarks/results/trl_parity.json]

Needs TRL (``pip install -c constraints.txt "trl>=1.16"``, which keeps torch; measured with TRL 1.16.0, where
``GKDTrainer`` lives in ``trl.experimental.gkd``). TRL is not a dependency of distill.

1. **Loss parity.** TRL's ``GKDTrainer.generalized_jsd_loss`` (a static method) against distill's
   ``token_gjsd`` (and ``token_fkl`` / ``token_rkl`` at β = 0 / 1) on the same logits: those of the
   two models on real batches, and sharper random logits; several β and temperatures; padding
   masks (labels −100); the gradient with respect to the student's logits as well as the value;
   an fp64 reference; bf16 logits; and teacher / student vocabularies of different padded widths.
   The conventions are mapped (see ``CONVENTIONS``) and checked, not assumed.
2. **Throughput.** A few hundred optimizer steps of each trainer with the same models, initial
   weights, batches (same order), batch size, sequence length, AdamW, learning rate, gradient
   clipping and β, on 1 torch thread: TRL's ``GKDTrainer`` off-policy (λ = 0) and on-policy
   (λ = 0.5), each with gradient checkpointing off (distill's compute) and on (TRL's default),
   distill's ``DistillTrainer`` (a ``transformers.Trainer``) with a ``token_gjsd`` term,
   and distill's own ``Trainer`` + ``Distiller`` (+ ``OnPolicyTransform`` for λ = 0.5). Runs are
   interleaved, repeated, and reported as medians of sequence tokens per second (batch × length per
   optimizer step, generation included) measured over steady-state steps.
3. **Loss curves.** The off-policy runs start from the same weights and see the same batches in
   the same order, so their per-step losses must agree; the first steps are compared.

Writes ``--out`` (JSON) and the same name with ``.md``. ``--quick`` is a smoke test (few steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill.losses.token_divergences import token_fkl_loss, token_gjsd_loss, token_rkl_loss  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

FULL = dict(steps=200, repeats=3, warmup_steps=10, batch=16, block=64, prompt=32, new_tokens=32, lr=1e-3,
            beta=0.5, clip=1.0, align_steps=20,
            student=dict(n_layer=2, n_head=4, n_embd=64),
            teacher=dict(num_hidden_layers=4, num_attention_heads=4, hidden_size=128, intermediate_size=344,
                         initializer_range=0.2))
QUICK = dict(FULL, steps=14, repeats=1, warmup_steps=4, align_steps=6)

CONVENTIONS = {
    "beta": "same meaning: both mix m = beta * p_teacher + (1 - beta) * p_student and take "
            "beta * KL(p_t || m) + (1 - beta) * KL(p_s || m); beta = 0 is forward KL(p_t || p_s) and "
            "beta = 1 reverse KL(p_s || p_t) at full scale in both (not the vanishing limit of the formula)",
    "temperature": "both divide both sides' logits by T; distill multiplies the KL-type losses by T^2, TRL "
                   "does not: distill(T) = T^2 * TRL(T). GKDTrainer.compute_loss never passes its "
                   "temperature to the loss (GKDConfig.temperature only sets the sampling temperature), "
                   "so TRL trains on T = 1 whatever the config says",
    "reduction": "with labels, TRL's reduction='batchmean' is sum over the vocabulary and the scored tokens "
                 "divided by the number of scored tokens (labels != -100): distill's mean over the mask. "
                 "In training TRL divides by num_items_in_batch instead: the Trainer's count of "
                 "labels != -100 (of labels[:, 1:] for models whose loss_type is ForCausalLM; GPT2LMHeadModel's is "
                 "None) in the batch as it came from the data loader, before any on-policy replacement. Without labels TRL "
                 "divides the sum by the batch size (per-sequence sums): TRL(no labels) = L * distill(no mask) "
                 "for sequences of L positions",
    "mask": "TRL: labels[:, 1:] != -100 scores logits[:, :-1]; distill: mask over logits positions "
            "(token_mask shifts attention_mask the same way, leaving each sequence's last position out)",
    "vocabulary": "TRL needs the same logits width on both sides (the loss broadcasts; GKDTrainer refuses "
                  "different config.vocab_size); distill cuts a padded vocabulary to the common width",
}


# ------------------------------------------------------------------------------ data, tokenizer, models
def char_tokenizer(text: str):
    """A character-level ``PreTrainedTokenizerFast`` (what TRL takes as ``processing_class``): one id per
    character of the text, and ``<pad>`` = 0."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text))
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")


def load_blocks(tokenizer, block: int) -> tuple[torch.Tensor, int]:
    text = DATA.read_text()
    cut = int(0.9 * len(text))  # the training part, as lm_distill
    ids = torch.tensor(tokenizer(text[:cut])["input_ids"], dtype=torch.long)
    n = ids.numel() // block
    return ids[: n * block].view(n, block), len(tokenizer)


def make_models(spec: dict, vocab: int, seed: int, teacher_vocab: int | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                         **spec["student"]))
    torch.manual_seed(seed + 1)
    # a larger initializer_range makes the random teacher's next-token distributions peaked rather than
    # nearly uniform, so the divergences (and their gradients) are far from zero
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=teacher_vocab or vocab, max_position_embeddings=128,
                                           bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                           **spec["teacher"]))
    for model in (student, teacher):
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return student.eval(), teacher.eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ 1. loss parity
def trl_loss(student, teacher, labels, beta, temperature, **kw):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature, **kw)


def distill_loss(student, teacher, mask, beta, temperature, loss="token_gjsd", **kw):
    if loss == "token_fkl":
        return token_fkl_loss(student, teacher, mask, temperature=temperature, **kw)
    if loss == "token_rkl":
        return token_rkl_loss(student, teacher, mask, temperature=temperature, **kw)
    return token_gjsd_loss(student, teacher, mask, beta=beta, temperature=temperature, **kw)


def value_and_grad(fn, student, teacher, *args, **kw):
    s = student.detach().clone().requires_grad_(True)
    value = fn(s, teacher.detach(), *args, **kw)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach().double(), grad.double()


def compare(student, teacher, labels, beta, temperature, loss="token_gjsd", chunk_tokens=4096) -> dict:
    """TRL and distill on the same logits ``[B, L, V]`` and labels ``[B, L]`` (already aligned with the
    logits: label j is what logits j predict, -100 to skip); distill's value divided by T²."""
    mask = labels != -100
    scale = temperature ** 2
    t_val, t_grad = value_and_grad(trl_loss, student, teacher, labels, beta, temperature)
    d_val, d_grad = value_and_grad(distill_loss, student, teacher, mask, beta, temperature, loss,
                                   chunk_tokens=chunk_tokens)
    d_val, d_grad = d_val / scale, d_grad / scale
    ref, ref_grad = value_and_grad(trl_loss, student.double(), teacher.double(), labels, beta, temperature)
    return {
        "trl": float(t_val), "distill_over_T2": float(d_val),
        "abs_diff": float((t_val - d_val).abs()),
        "rel_diff": float((t_val - d_val).abs() / t_val.abs().clamp_min(1e-30)),
        "grad_max_abs_diff": float((t_grad - d_grad).abs().max()),
        "grad_max_abs": float(t_grad.abs().max()),
        "trl_vs_fp64": float((t_val - ref).abs()), "distill_vs_fp64": float((d_val - ref).abs()),
        "trl_grad_vs_fp64": float((t_grad - ref_grad).abs().max()),
        "distill_grad_vs_fp64": float((d_grad - ref_grad).abs().max()),
    }


def padded_labels(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Next-token labels ``[B, L-1]`` of ``ids`` ``[B, L]`` with rows cut to random lengths (right padding,
    -100) and one row's first quarter masked as a prompt."""
    gen = torch.Generator().manual_seed(seed)
    labels = ids[:, 1:].clone()
    length = labels.shape[1]
    keep = torch.randint(length // 4, length + 1, (labels.shape[0],), generator=gen)
    for row, k in enumerate(keep.tolist()):
        labels[row, k:] = -100
    labels[0, : length // 4] = -100
    return labels


@torch.no_grad()
def model_logits(student, teacher, ids):
    return student(input_ids=ids).logits[:, :-1].float(), teacher(input_ids=ids).logits[:, :-1].float()


def parity(spec: dict, blocks: torch.Tensor, vocab: int, student, teacher, quick: bool) -> dict:
    betas = [0.0, 0.1, 0.5, 0.9, 1.0]
    temperatures = [0.5, 1.0, 2.0]
    ids = blocks[:8]
    s_model, t_model = model_logits(student, teacher, ids)
    labels = padded_labels(ids, 0)
    gen = torch.Generator().manual_seed(1)
    sources = {
        "models": (s_model, t_model),
        # sharper random logits: distributions far apart, large per-token divergences
        "sharp": (4 * torch.randn(s_model.shape, generator=gen), 6 * torch.randn(t_model.shape, generator=gen)),
    }
    rows = []
    for source, (s, t) in sources.items():
        for beta in betas:
            for temperature in temperatures:
                losses = ["token_gjsd"] + (["token_fkl"] if beta == 0 else []) + (["token_rkl"] if beta == 1 else [])
                for loss in losses:
                    rows.append({"source": source, "beta": beta, "temperature": temperature, "loss": loss,
                                 "scored_tokens": int((labels != -100).sum()),
                                 **compare(s, t, labels, beta, temperature, loss)})
    # chunking does not change the value: 37-token chunks
    for beta in (0.0, 0.5, 1.0):
        rows.append({"source": "sharp, chunk_tokens=37", "beta": beta, "temperature": 1.0, "loss": "token_gjsd",
                     "scored_tokens": int((labels != -100).sum()),
                     **compare(*sources["sharp"], labels, beta, 1.0, chunk_tokens=37)})
    summary = {
        "max_abs_diff": max(r["abs_diff"] for r in rows),
        "max_rel_diff": max(r["rel_diff"] for r in rows),
        "max_grad_abs_diff": max(r["grad_max_abs_diff"] for r in rows),
        "settings": len(rows),
    }

    extra = {}
    # training-time reduction: TRL with num_items_in_batch = count of scored tokens is the same mean
    s, t = sources["sharp"]
    mask = labels != -100
    with torch.no_grad():
        trl_items = trl_loss(s, t, labels, 0.5, 1.0, num_items_in_batch=int(mask.sum()))
        d = distill_loss(s, t, mask, 0.5, 1.0)
        trl_nolabels = trl_loss(s, t, None, 0.5, 1.0)
        d_nomask = distill_loss(s, t, None, 0.5, 1.0)
    extra["num_items_in_batch"] = {"trl": float(trl_items), "distill": float(d),
                                   "abs_diff": float((trl_items - d).abs())}
    extra["no_labels"] = {"trl_batchmean": float(trl_nolabels), "distill_no_mask": float(d_nomask),
                          "positions_per_sequence": s.shape[1], "ratio": float(trl_nolabels / d_nomask)}
    # bf16 logits: TRL computes in the inputs' dtype, distill casts each chunk to fp32
    s16, t16 = s.bfloat16(), t.bfloat16()
    with torch.no_grad():
        ref = trl_loss(s16.double(), t16.double(), labels, 0.5, 1.0)
        extra["bf16_logits"] = {"beta": 0.5, "fp64_reference": float(ref),
                                "trl_abs_err": float((trl_loss(s16, t16, labels, 0.5, 1.0).double() - ref).abs()),
                                "distill_abs_err": float((distill_loss(s16, t16, mask, 0.5, 1.0).double() - ref).abs())}
    # padded vocabularies: GPT-2's 50,257 tokens, the teacher's output padded to 50,304 (a multiple of 64)
    gen = torch.Generator().manual_seed(2)
    b, length = (1, 16) if quick else (2, 32)
    s_big = 3 * torch.randn(b, length, 50257, generator=gen)
    t_big = 3 * torch.randn(b, length, 50304, generator=gen)
    big_labels = torch.randint(0, 50257, (b, length), generator=gen)
    big_labels[0, length // 2:] = -100
    try:
        trl_loss(s_big, t_big, big_labels, 0.5, 1.0)
        trl_padded = "accepted"
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        trl_padded = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    padded_rows = []
    for beta in (0.0, 0.5, 1.0):
        # TRL on the teacher cut by hand to the real vocabulary, distill on the padded teacher as it is
        r = compare(s_big, t_big[..., :50257], big_labels, beta, 1.0)
        with torch.no_grad():
            d_padded = distill_loss(s_big, t_big, big_labels != -100, beta, 1.0)
        r["distill_padded_teacher"] = float(d_padded)
        r["padded_abs_diff"] = abs(float(d_padded) - r["trl"])
        padded_rows.append({"beta": beta, **r})
    extra["padded_vocab"] = {"student_width": 50257, "teacher_width": 50304, "trl_on_padded": trl_padded,
                             "rows": padded_rows}
    # the trainer itself: different config.vocab_size (tiny models, 66 vs 72 logits)
    extra["padded_vocab"]["gkdtrainer_init"] = gkd_init_with_padded_teacher(spec, vocab)
    return {"rows": rows, "summary": summary, **extra}


def gkd_init_with_padded_teacher(spec: dict, vocab: int) -> str:
    padded = -(-vocab // 8) * 8
    student, teacher = make_models(spec, vocab, 0, teacher_vocab=padded)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trl_trainer(student, teacher, spec, tmp, blocks=torch.zeros(4, spec["block"], dtype=torch.long),
                        lam=0.0, steps=1, tokenizer=TOKENIZER)
        return f"accepted ({vocab} vs {padded})"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__} ({vocab} vs {padded} logits): {str(exc).splitlines()[0][:200]}"


# ------------------------------------------------------------------------------ 2. trainers
TOKENIZER = None  # set in main


class StepClock:
    """Timestamps of optimizer steps and the loss of each step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.scored: list[tuple[int, int]] = []  # TRL: (tokens scored, num_items_in_batch) per step

    def tokens_per_second(self, tokens_per_step: int, warmup: int) -> float:
        times = self.times[warmup:]
        return tokens_per_step * (len(times) - 1) / (times[-1] - times[0])


def hf_dataset(blocks: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks.tolist()})


def collator(prompt: int):
    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        ones = torch.ones_like(ids)
        # off-policy batches score every next token; "prompts" is what on-policy sampling continues.
        # The first token is never a target: -100 there makes the Trainer's num_items_in_batch the
        # scored count for any model class (it counts labels[:, 1:] only for models whose loss_type
        # is ForCausalLM, which GPT2LMHeadModel's is not)
        labels = ids.clone()
        labels[:, 0] = -100
        return {"input_ids": ids, "attention_mask": ones, "labels": labels,
                "prompts": ids[:, :prompt], "prompt_attention_mask": ones[:, :prompt]}

    return collate


def hf_args(cls, spec: dict, out: str, steps: int, **extra):
    return cls(output_dir=out, max_steps=steps, per_device_train_batch_size=spec["batch"],
               learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
               optim="adamw_torch", max_grad_norm=spec["clip"], logging_steps=10**6, save_strategy="no",
               report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
               train_sampling_strategy="sequential", remove_unused_columns=False, **extra)


def clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.times.append(time.perf_counter())

    return Clock()


def trl_trainer(student, teacher, spec, out, blocks, lam, steps, tokenizer, clock=None, checkpointing=False):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Recorded(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if clock is not None:
                clock.losses.append(float((loss[0] if return_outputs else loss).detach()))
                if num_items_in_batch is not None:
                    clock.scored.append((int((inputs["labels"][:, 1:] != -100).sum()), int(num_items_in_batch)))
            return loss

    args = hf_args(GKDConfig, spec, out, steps, lmbda=lam, beta=spec["beta"], temperature=1.0,
                   max_new_tokens=spec["new_tokens"], max_length=None,
                   # TRL's default is True (recompute the student's activations in backward, and sample
                   # without a KV cache); False matches distill's compute
                   gradient_checkpointing=checkpointing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Recorded(model=student, teacher_model=teacher, args=args, train_dataset=hf_dataset(blocks),
                           processing_class=tokenizer, data_collator=collator(spec["prompt"]),
                           callbacks=[clock_callback(clock)] if clock else None)
    return trainer


def distill_hf_trainer(student, teacher, spec, out, blocks, steps, clock):
    from transformers import TrainingArguments

    from distill.nlp import DistillTrainer
    from distill.objective import Term

    class Recorded(DistillTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            clock.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    return Recorded(model=student, teacher=teacher,
                    terms=[Term("gkd", "token_gjsd", params={"beta": spec["beta"]})],
                    args=hf_args(TrainingArguments, spec, out, steps), train_dataset=hf_dataset(blocks),
                    data_collator=collator(spec["prompt"]), callbacks=[clock_callback(clock)])


class TimedLoader:
    """Fixed batches in a fixed order, ``{"input": ids, "mask": ...}``, timestamping each hand-over."""

    def __init__(self, blocks: torch.Tensor, batch: int, steps: int, clock: StepClock) -> None:
        self.blocks, self.batch, self.steps, self.clock = blocks, batch, steps, clock

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for step in range(self.steps):
            if step:
                self.clock.times.append(time.perf_counter())  # the previous step is done
            ids = self.blocks[step * self.batch:(step + 1) * self.batch]
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[:, -1] = False  # as TRL: the last position predicts no label
            yield {"input": ids, "mask": mask}
        self.clock.times.append(time.perf_counter())


def distill_trainer(student, teacher, spec, blocks, lam, steps, clock):
    from distill.nlp.hf import HFModel
    from distill.objective import Distiller, Term
    from distill.tasks.causal_lm import OnPolicyTransform
    from distill.trainer import TrainConfig, Trainer

    s, t = HFModel(student), HFModel(teacher)  # what load_pretrained / from_config give a user
    distiller = Distiller(s, t, [Term("gkd", "token_gjsd", params={"beta": spec["beta"]})])
    distiller.register_forward_hook(lambda module, args, out: clock.losses.append(float(out.loss.detach())))
    config = TrainConfig(epochs=1, optimizer="adamw", lr=spec["lr"], weight_decay=0.0, schedule="constant",
                         clip_grad_norm=spec["clip"], seed=0, progress=False, tensorboard=False,
                         restore_best=False)
    transform = OnPolicyTransform(s, lam=lam, max_new_tokens=spec["new_tokens"], temperature=1.0) if lam else None
    return Trainer(distiller, TimedLoader(blocks, spec["batch"], steps, clock), config, batch_transform=transform)


TRL0, TRL0_DEFAULT = "TRL GKDTrainer, lambda=0", "TRL GKDTrainer, lambda=0, TRL's default gradient checkpointing"
HF0, OURS0 = "distill DistillTrainer (HF Trainer), token_gjsd", "distill Trainer + Distiller, token_gjsd"
TRL5, TRL5_DEFAULT = "TRL GKDTrainer, lambda=0.5", "TRL GKDTrainer, lambda=0.5, TRL's default gradient checkpointing"
OURS5 = "distill Trainer + OnPolicyTransform, lambda=0.5"
RUNS = [
    # (name, trainer kind, on-policy lambda, TRL gradient checkpointing)
    (TRL0, "trl", 0.0, False),
    (TRL0_DEFAULT, "trl", 0.0, True),
    (HF0, "distill_hf", 0.0, False),
    (OURS0, "distill", 0.0, False),
    (TRL5, "trl", 0.5, False),
    (TRL5_DEFAULT, "trl", 0.5, True),
    (OURS5, "distill", 0.5, False),
]


def run_once(kind: str, lam: float, spec: dict, student0, teacher, blocks, steps: int, checkpointing: bool) -> dict:
    student = copy.deepcopy(student0).train()
    clock = StepClock()
    random.seed(0)  # TRL's on-policy coin is Python's random (the Trainer reseeds it too)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if kind == "trl":
            trainer = trl_trainer(student, teacher, spec, tmp, blocks, lam, steps, TOKENIZER, clock, checkpointing)
            trainer.train()
        elif kind == "distill_hf":
            distill_hf_trainer(student, teacher, spec, tmp, blocks, steps, clock).train()
        else:
            trainer = distill_trainer(student, teacher, spec, blocks, lam, steps, clock)
            trainer.fit()
            on = trainer.batch_transform.on_policy_batches if trainer.batch_transform else 0
        total = time.perf_counter() - started
    tokens = spec["batch"] * spec["block"]
    out = {"steps": len(clock.times), "wall_seconds": total,
           "tokens_per_second": clock.tokens_per_second(tokens, spec["warmup_steps"]),
           "tokens_per_second_incl_setup": tokens * steps / total, "losses": clock.losses}
    if kind == "distill" and lam:
        out["on_policy_batches"] = on
    if kind == "trl":
        # steps whose loss TRL divides by a count other than the tokens it scores (on-policy batches:
        # num_items_in_batch is counted on the batch before the student's samples replace it)
        off = [(a, b) for a, b in clock.scored if a != b]
        out["trl_steps"] = len(clock.scored)
        out["trl_misnormalised_steps"] = len(off)
        out["trl_scored_over_num_items"] = sorted({round(a / b, 4) for a, b in off})
    return out


def throughput(spec: dict, blocks, student0, teacher) -> dict:
    steps = spec["steps"]
    data = blocks[: steps * spec["batch"]]
    results: dict[str, list[dict]] = {name: [] for name, *_ in RUNS}
    for repeat in range(spec["repeats"]):
        order = RUNS if repeat % 2 == 0 else RUNS[::-1]  # interleaved, alternating order
        for name, kind, lam, checkpointing in order:
            r = run_once(kind, lam, spec, student0, teacher, data, steps, checkpointing)
            results[name].append(r)
            print(f"  repeat {repeat + 1}: {name}: {r['tokens_per_second']:.0f} tokens/s "
                  f"({r['wall_seconds']:.1f} s wall)", flush=True)
    table = {}
    for name, kind, lam, checkpointing in RUNS:
        rs = results[name]
        table[name] = {
            "kind": kind, "lambda": lam, "trl_gradient_checkpointing": checkpointing if kind == "trl" else None,
            "tokens_per_second_median": statistics.median(r["tokens_per_second"] for r in rs),
            "tokens_per_second_runs": [r["tokens_per_second"] for r in rs],
            "tokens_per_second_incl_setup_median": statistics.median(r["tokens_per_second_incl_setup"] for r in rs),
            "wall_seconds_runs": [r["wall_seconds"] for r in rs],
            "first_losses": rs[0]["losses"][: spec["align_steps"]],
            "last_loss_mean10": sum(rs[0]["losses"][-10:]) / len(rs[0]["losses"][-10:]),
            "losses_repeatable": all(r["losses"] == rs[0]["losses"] for r in rs),
            "on_policy_batches": [r.get("on_policy_batches") for r in rs] if kind == "distill" and lam else None,
        }
        if kind == "trl":
            table[name]["trl_misnormalised_steps"] = [r["trl_misnormalised_steps"] for r in rs]
            table[name]["trl_scored_over_num_items"] = sorted({x for r in rs for x in r["trl_scored_over_num_items"]})
    ratios = {
        "distill Trainer / TRL (lambda=0)": ratio(results, OURS0, TRL0),
        "DistillTrainer / TRL (lambda=0)": ratio(results, HF0, TRL0),
        "distill Trainer / TRL (lambda=0.5)": ratio(results, OURS5, TRL5),
        "distill Trainer / TRL with its default checkpointing (lambda=0)": ratio(results, OURS0, TRL0_DEFAULT),
        "DistillTrainer / TRL with its default checkpointing (lambda=0)": ratio(results, HF0, TRL0_DEFAULT),
        "distill Trainer / TRL with its default checkpointing (lambda=0.5)": ratio(results, OURS5, TRL5_DEFAULT),
    }
    # loss curves: the off-policy runs see the same weights and batches
    ref = results[TRL0][0]["losses"]
    align = {}
    for name in (TRL0_DEFAULT, HF0, OURS0):
        other = results[name][0]["losses"]
        n = min(len(ref), len(other))
        k = min(spec["align_steps"], n)
        align[name] = {
            "first_steps": k,
            "max_abs_diff_first": max(abs(a - b) for a, b in zip(ref[:k], other[:k])),
            "max_rel_diff_first": max(abs(a - b) / abs(a) for a, b in zip(ref[:k], other[:k])),
            "max_abs_diff_all": max(abs(a - b) for a, b in zip(ref[:n], other[:n])),
            "steps_compared_all": n,
        }
    return {"runs": table, "ratios_of_medians": ratios, "alignment_vs_trl_lambda0": align,
            "steps": steps, "repeats": spec["repeats"], "warmup_steps_excluded": spec["warmup_steps"],
            "tokens_per_step": spec["batch"] * spec["block"]}


def ratio(results, a: str, b: str) -> dict:
    pa = [r["tokens_per_second"] for r in results[a]]
    pb = [r["tokens_per_second"] for r in results[b]]
    paired = [x / y for x, y in zip(pa, pb)]
    return {"ratio_of_medians": statistics.median(pa) / statistics.median(pb),
            "paired_ratios": paired}


# ------------------------------------------------------------------------------ main, report
def main(argv: list[str] | None = None) -> int:
    global TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps, one repeat")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl_parity.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = dict(QUICK if args.quick else FULL)
    if args.steps:
        spec["steps"] = args.steps
    if args.repeats:
        spec["repeats"] = args.repeats
    wall, cpu = time.perf_counter(), time.process_time()

    import transformers

    try:
        import trl
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"this benchmark compares against TRL's GKDTrainer ({exc}); "
                         'pip install -c constraints.txt "trl>=1.16"') from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    TOKENIZER = char_tokenizer(DATA.read_text())
    blocks, vocab = load_blocks(TOKENIZER, spec["block"])
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    student0, teacher = make_models(spec, vocab, 0)
    teacher.requires_grad_(False)
    print(f"vocabulary {vocab}; student {count_params(student0):,} parameters, teacher {count_params(teacher):,}",
          flush=True)

    started = time.perf_counter()
    par = parity(spec, blocks, vocab, student0, teacher, args.quick)
    par["seconds"] = time.perf_counter() - started
    print(f"parity: {par['summary']} ({par['seconds']:.0f} s)", flush=True)
    started = time.perf_counter()
    thr = throughput(spec, blocks, student0, teacher)
    thr["seconds"] = time.perf_counter() - started

    command = "python benchmarks/trl_parity.py" + (" --quick" if args.quick else "") + (
        f" --steps {args.steps}" if args.steps else "") + (f" --repeats {args.repeats}" if args.repeats else "")
    result = {
        "benchmark": "trl_parity",
        "command": command,
        "quick": args.quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "load_average_at_end": list(os.getloadavg()),
        "settings": {**spec, "vocab": vocab, "student_params": count_params(student0),
                     "teacher_params": count_params(teacher), "temperature": 1.0,
                     "student_model": "GPT2LMHeadModel", "teacher_model": "LlamaForCausalLM",
                     "data": "Tiny Shakespeare, first 90 %, character-level, blocks shuffled once (seed 0)"},
        "git": git_state(),
        "conventions": CONVENTIONS,
        "parity": par,
        "throughput": thr,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def git_state() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        changed = [line[3:] for line in dirty if line.strip()]
        return f"HEAD {head}" + (f", uncommitted changes in {len(changed)} file(s) under src/" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def markdown(result: dict) -> str:
    m, s, par, thr = result["machine"], result["settings"], result["parity"], result["throughput"]
    load = ", ".join(f"{x:.1f}" for x in result["load_average_at_end"])
    lines = [
        "# distill vs TRL's GKDTrainer: loss parity and throughput",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU, "
        f"{m['threads']} torch thread(s), {m['cpus']}-CPU {m['processor']} ({m['platform']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {m['trl']}, {result['date']}, load average at the end {load}."
        + (" **Quick smoke test: the numbers mean nothing.**" if result["quick"] else ""),
        "",
        f"Models (random, from config, seeded): student GPT-2 {s['student']} ({s['student_params']:,} parameters), "
        f"teacher Llama {s['teacher']} ({s['teacher_params']:,}); character vocabulary of {s['vocab']} "
        f"(65 characters + `<pad>`); {s['data']}.",
        "",
        "## Conventions (TRL `GKDTrainer.generalized_jsd_loss` vs distill `token_gjsd`)",
        "",
    ]
    lines += [f"- **{k}**: {v}." for k, v in result["conventions"].items()]
    summary = par["summary"]
    lines += [
        "",
        "## Loss parity",
        "",
        f"{summary['settings']} settings (β ∈ {{0, 0.1, 0.5, 0.9, 1}} × T ∈ {{0.5, 1, 2}} on the models' logits of "
        "8 blocks and on sharper random logits, `token_fkl` / `token_rkl` at β = 0 / 1, 37-token chunks), "
        "labels −100 on random right padding and one masked prompt; distill's value and gradient divided by T². "
        f"Largest |TRL − distill|: **{fmt(summary['max_abs_diff'])}** (relative {fmt(summary['max_rel_diff'])}); "
        f"largest gradient difference (w.r.t. the student's logits, max over elements): "
        f"{fmt(summary['max_grad_abs_diff'])}. All fp32.",
        "",
        "| logits | loss | β | T | TRL | distill / T² | abs diff | rel diff | grad max abs diff | TRL err vs fp64 "
        "| distill err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in par["rows"]:
        lines.append(f"| {r['source']} | {r['loss']} | {r['beta']} | {r['temperature']} | {r['trl']:.6g} | "
                     f"{r['distill_over_T2']:.6g} | {fmt(r['abs_diff'])} | {fmt(r['rel_diff'])} | "
                     f"{fmt(r['grad_max_abs_diff'])} | {fmt(r['trl_vs_fp64'])} | {fmt(r['distill_vs_fp64'])} |")
    ni, nl, bf, pv = par["num_items_in_batch"], par["no_labels"], par["bf16_logits"], par["padded_vocab"]
    lines += [
        "",
        f"- Training-time reduction (`num_items_in_batch` = scored tokens): TRL {ni['trl']:.6g}, distill "
        f"{ni['distill']:.6g}, diff {fmt(ni['abs_diff'])}.",
        f"- No labels: TRL's `batchmean` {nl['trl_batchmean']:.6g} vs distill without mask {nl['distill_no_mask']:.6g}: "
        f"ratio {nl['ratio']:.4f} = the {nl['positions_per_sequence']} positions per sequence (TRL sums per "
        "sequence, distill averages per token).",
        f"- bf16 logits (β = 0.5): error against the fp64 value of the same bf16 logits, TRL "
        f"{fmt(bf['trl_abs_err'])} (computes in bf16), distill {fmt(bf['distill_abs_err'])} (fp32 per chunk).",
        f"- Padded vocabularies (student {pv['student_width']:,} logits, teacher {pv['teacher_width']:,}): TRL's loss "
        f"on them: `{pv['trl_on_padded']}`; `GKDTrainer` with models of different `vocab_size`: "
        f"`{pv['gkdtrainer_init']}`. TRL on the teacher cut by hand to 50,257 vs distill on the padded teacher: "
        + "; ".join(f"β = {r['beta']}: {fmt(r['padded_abs_diff'])}" for r in pv["rows"]) + ".",
        "",
        "## Throughput",
        "",
        f"{thr['steps']} optimizer steps per run, batch {s['batch']} × {s['block']} tokens "
        f"({thr['tokens_per_step']:,} sequence tokens per step), AdamW lr {s['lr']} constant, no weight decay, "
        f"gradient clipping {s['clip']}, β = {s['beta']}, T = 1; on-policy: prompts of {s['prompt']} tokens "
        f"continued by {s['new_tokens']} sampled tokens (T = 1). Tokens/s over the steps after the first "
        f"{thr['warmup_steps_excluded']} (setup excluded; generation included); median of {thr['repeats']} "
        "interleaved repeats (order alternating).",
        "",
        "| trainer | tokens/s (median) | runs | incl. setup | last-10-step loss |",
        "|---|---|---|---|---|",
    ]
    for name, r in thr["runs"].items():
        runs = ", ".join(f"{x:.0f}" for x in r["tokens_per_second_runs"])
        lines.append(f"| {name} | **{r['tokens_per_second_median']:.0f}** | {runs} | "
                     f"{r['tokens_per_second_incl_setup_median']:.0f} | {r['last_loss_mean10']:.4f} |")
    lines += ["", "| ratio | of medians | paired (per repeat) |", "|---|---|---|"]
    for name, r in thr["ratios_of_medians"].items():
        lines.append(f"| {name} | **{r['ratio_of_medians']:.2f}** | "
                     + ", ".join(f"{x:.2f}" for x in r["paired_ratios"]) + " |")
    lines += ["", "Loss curves (off-policy, same initial weights, same batches in the same order), against "
              f"{TRL0}:", ""]
    for name, a in thr["alignment_vs_trl_lambda0"].items():
        lines.append(f"- {name}: first {a['first_steps']} steps max |diff| {fmt(a['max_abs_diff_first'])} "
                     f"(relative {fmt(a['max_rel_diff_first'])}); all {a['steps_compared_all']} steps "
                     f"{fmt(a['max_abs_diff_all'])}.")
    first = {name: thr["runs"][name]["first_losses"][:5] for name in (TRL0, HF0, OURS0)}
    for name, values in first.items():
        lines.append(f"- {name}, first losses: {', '.join(f'{x:.6f}' for x in values)}.")
    trl_on, ours_on = thr["runs"][TRL5], thr["runs"][OURS5]
    factors = ", ".join(f"{x:.4f}" for x in sorted(set(trl_on["trl_scored_over_num_items"]
                                                       + thr["runs"][TRL5_DEFAULT]["trl_scored_over_num_items"])))
    factors = factors or "none"
    lines += [
        "",
        "On-policy (λ = 0.5; the coins differ, Python's `random` in TRL and the step's generator in distill, so "
        "the curves are not comparable step by step): TRL drew "
        + ", ".join(map(str, trl_on["trl_misnormalised_steps"])) + " on-policy steps per run, distill "
        + ", ".join(map(str, ours_on["on_policy_batches"])) + f" of {thr['steps']}. On TRL's on-policy steps the "
        "loss is the sum over the sampled tokens divided by `num_items_in_batch`, which the Trainer counted on "
        f"the batch before the student's samples replaced it: scored / counted = {factors}, so those steps are "
        "weighted down by that factor (distill averages over the sampled tokens; the last-10-step losses "
        "of TRL's λ = 0.5 runs are lower for that reason). TRL samples with `model.generate`, with a KV cache "
        "unless gradient checkpointing is on (TRL's default: `use_cache=False`); distill's `OnPolicyTransform` "
        "samples with `distill.tasks.causal_lm.generate`, which reuses the Hugging Face model's keys and values. "
        "TRL's configs default to `gradient_checkpointing=True` (SFTConfig), which recomputes the student's "
        "forward in backward; the rows without that note turn it off, to match distill's compute.",
        "",
        f"Git: {result['git']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
