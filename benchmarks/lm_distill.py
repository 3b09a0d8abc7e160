"""Benchmark: distilling a small character-level GPT on Tiny Shakespeare with each token-level loss.

    python benchmarks/lm_distill.py [--threads 1] [--quick] [--data PATH] [--out benchmarks/results/lm_distill.json]

Trains a GPT teacher (4 layers x 128 dims) on Tiny Shakespeare's first 90 % (64-character blocks),
then 2-layer x 64-dim students with the same schedule and seed:

- alone, with next-token cross-entropy (``token_ce``);
- distilled with each divergence against the live teacher on the training blocks: forward KL,
  reverse KL, GKD's JSD at β = 0.5, total variation, DistiLLM's skew KL at α = 0.1 (all T = 1);
- on-policy (GKD, Agarwal et al. 2024): JSD β = 0.5 with λ = 0.5 of the batches replaced by
  continuations the student samples from the blocks' first half (``OnPolicyTransform``);
- sequence-level KD (Kim & Rush 2016): cross-entropy on continuations the teacher sampled once
  from training prompts (``sequence_kd_dataset``).

Every student sees the same number of optimizer steps. Reported on the held-out last 10 %:
perplexity (exp of the mean next-token cross-entropy, per character), top-1 next-character
accuracy, agreement with the teacher's top-1 next-character prediction, KL(teacher ‖ student), and
the teacher's NLL of the text the model samples from held-out prompts (``sample_teacher_nll``).
Writes ``--out`` (JSON) and the same name with ``.md``. ``--quick`` is a smoke test (a few steps): its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import distill  # noqa: E402
from distill.data import BatchLoader, load_dataset  # noqa: E402
from distill.data.types import ArrayDataset  # noqa: E402
from distill.models import count_params, create_model  # noqa: E402
from distill.objective import Distiller, Term  # noqa: E402
from distill.tasks.causal_lm import OnPolicyTransform, sample_teacher_nll, sequence_kd_dataset  # noqa: E402
from distill.trainer import TrainConfig, Trainer  # noqa: E402

FULL = dict(
    block=64, batch=32, teacher=dict(n_layer=4, n_head=4, n_embd=128), teacher_epochs=3,
    student=dict(n_layer=2, n_head=4, n_embd=64), student_epochs=1, lr_teacher=2e-3, lr_student=3e-3,
    new_tokens=32, seqkd_prompts=4096, seqkd_prompt_len=16, val_blocks=None, train_blocks=None,
    sample_prompts=512, sample_prompt_len=16, sample_new=48,
)
QUICK = dict(FULL, teacher_epochs=1, student_epochs=1, seqkd_prompts=64, val_blocks=64, train_blocks=256, sample_prompts=32,
             teacher=dict(n_layer=1, n_head=2, n_embd=32), student=dict(n_layer=1, n_head=2, n_embd=16))

# (name in the table, loss, params, on-policy λ)
DISTILLED = [
    ("forward KL", "token_fkl", {}, 0.0),
    ("reverse KL", "token_rkl", {}, 0.0),
    ("JSD β = 0.5", "token_gjsd", {"beta": 0.5}, 0.0),
    ("TVD", "token_tvd", {}, 0.0),
    ("skew KL α = 0.1", "token_skl", {"alpha": 0.1}, 0.0),
    ("on-policy JSD β = 0.5, λ = 0.5", "token_gjsd", {"beta": 0.5}, 0.5),
]


def config(epochs: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adamw", lr=lr, weight_decay=0.01, schedule="cosine",
                       warmup_epochs=0.05, clip_grad_norm=1.0, seed=seed, progress=False, tensorboard=False)


def make_gpt(data, options: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("gpt", data.num_classes, data.input_shape, **options)


@torch.no_grad()
def teacher_view(teacher, val: ArrayDataset, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities and top-1 predictions over the validation blocks, once."""
    teacher.eval()
    logps = [torch.log_softmax(teacher(val.inputs[i:i + batch]).float(), -1) for i in range(0, len(val), batch)]
    log_t = torch.cat(logps)
    return log_t, log_t.argmax(-1)


@torch.no_grad()
def evaluate(model, val: ArrayDataset, log_t: torch.Tensor | None, batch: int = 128) -> dict[str, float]:
    model.eval()
    nll = correct = agree = kl = 0.0
    for i in range(0, len(val), batch):
        log_s = torch.log_softmax(model(val.inputs[i:i + batch]).float(), -1)
        target = val.targets[i:i + batch]
        nll += float(-log_s.gather(-1, target.unsqueeze(-1)).sum())
        predicted = log_s.argmax(-1)
        correct += float((predicted == target).sum())
        if log_t is not None:
            lt = log_t[i:i + batch]
            agree += float((lt.argmax(-1) == predicted).sum())
            kl += float((lt.exp() * (lt - log_s)).sum())
    n = val.targets.numel()
    out = {"val_loss": nll / n, "perplexity": math.exp(nll / n), "accuracy": correct / n}
    if log_t is not None:
        out["agreement"] = agree / n
        out["kl_to_teacher"] = kl / n
    return out


def train(model, teacher, terms, loader, cfg, transform=None) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (with 1 thread, the compute time even when
    other jobs share the cores or the process is paused)."""
    distiller = Distiller(model, teacher, terms)
    started, cpu = time.perf_counter(), time.process_time()
    Trainer(distiller, loader, cfg, batch_transform=transform).fit()
    return time.perf_counter() - started, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, a few steps")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare"),
                        help="char-rnn's input.txt or its folder (downloaded when missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_distill.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    spec = QUICK if args.quick else FULL
    wall, wall_cpu = time.perf_counter(), time.process_time()

    path = Path(args.data)
    options = {"path": path} if path.exists() else {}
    data = load_dataset("tinyshakespeare", block_size=spec["block"], **options)
    train_set, val = data.train, data.test
    if spec["train_blocks"]:
        train_set = train_set.subset(torch.arange(spec["train_blocks"]))
    if spec["val_blocks"]:
        val = val.subset(torch.arange(spec["val_blocks"]))
    loader = BatchLoader(train_set, spec["batch"], shuffle=True, seed=args.seed, drop_last=True)
    steps = len(loader) * spec["student_epochs"]
    print(f"Tiny Shakespeare: {len(train_set)} training blocks of {spec['block']} characters, "
          f"{len(val)} held-out; vocabulary {data.num_classes}; {steps} student steps", flush=True)
    rows = []

    # ---- teacher
    teacher = make_gpt(data, spec["teacher"], args.seed)
    seconds, cpu = train(teacher, None, [Term("ce", "token_ce")], loader,
                         config(spec["teacher_epochs"], spec["lr_teacher"], args.seed))
    teacher.eval().requires_grad_(False)
    log_t, _ = teacher_view(teacher, val)
    # held-out prompts for the models' own text, judged by the teacher
    prompts = val.inputs[: spec["sample_prompts"], : spec["sample_prompt_len"]]

    def judged(model) -> float:
        return sample_teacher_nll(model, teacher, prompts, spec["sample_new"], temperature=1.0, seed=args.seed + 4)

    metrics = evaluate(teacher, val, log_t)
    metrics["sample_teacher_nll"] = judged(teacher)
    rows.append({"run": "teacher", "model": spec["teacher"], "params": count_params(teacher),
                 "steps": len(loader) * spec["teacher_epochs"], "train_seconds": seconds, "train_cpu_seconds": cpu,
                 **metrics})
    print(f"teacher: {metrics} ({seconds:.0f} s wall, {cpu:.0f} s CPU)", flush=True)

    def student_row(name, model, timing, extra=None):
        metrics = evaluate(model, val, log_t)
        metrics["sample_teacher_nll"] = judged(model)
        row = {"run": name, "model": spec["student"], "params": count_params(model), "steps": steps,
               "train_seconds": timing[0], "train_cpu_seconds": timing[1], **metrics, **(extra or {})}
        rows.append(row)
        print(f"{name}: ppl {metrics['perplexity']:.3f}, agreement {metrics['agreement']:.4f}, "
              f"teacher NLL of its samples {metrics['sample_teacher_nll']:.3f} "
              f"({timing[0]:.0f} s wall, {timing[1]:.0f} s CPU)", flush=True)

    student_cfg = config(spec["student_epochs"], spec["lr_student"], args.seed)

    # ---- the student alone
    student = make_gpt(data, spec["student"], args.seed + 1)
    student_row("student alone (cross-entropy)", student,
                train(student, None, [Term("ce", "token_ce")], loader, student_cfg))

    # ---- token-level distillation, off- and on-policy
    for name, loss, params, lam in DISTILLED:
        student = make_gpt(data, spec["student"], args.seed + 1)
        transform = OnPolicyTransform(student, lam=lam, max_new_tokens=spec["new_tokens"]) if lam else None
        timing = train(student, teacher, [Term("kd", loss, params=params)], loader, student_cfg, transform)
        extra = {"loss": loss, "params_loss": params, "lambda": lam}
        if transform is not None:
            extra["on_policy_batches"] = transform.on_policy_batches
        student_row(name, student, timing, extra)

    # ---- sequence-level KD: the teacher writes a training set once
    started = time.process_time()
    generator = torch.Generator().manual_seed(args.seed + 2)
    chosen = torch.randperm(len(train_set), generator=generator)[: spec["seqkd_prompts"]]
    prompts = train_set.inputs[chosen, : spec["seqkd_prompt_len"]]
    written = sequence_kd_dataset(teacher, prompts, spec["block"] + 1 - spec["seqkd_prompt_len"],
                                  temperature=1.0, batch_size=256, seed=args.seed + 3)
    generation = time.process_time() - started
    seq_loader = BatchLoader(written, spec["batch"], shuffle=True, seed=args.seed, drop_last=True)
    seq_epochs = max(1, round(steps / len(seq_loader)))
    student = make_gpt(data, spec["student"], args.seed + 1)
    timing = train(student, None, [Term("ce", "token_ce")], seq_loader,
                   config(seq_epochs, spec["lr_student"], args.seed))
    student_row("sequence-level KD (teacher samples, cross-entropy)", student, timing,
                {"generation_cpu_seconds": generation, "sequences": len(written),
                 "steps": seq_epochs * len(seq_loader)})

    total, total_cpu = time.perf_counter() - wall, time.process_time() - wall_cpu
    command = "python benchmarks/lm_distill.py" + (f" --threads {args.threads}" if args.threads != 1 else "") + (
        " --quick" if args.quick else "")
    result = {
        "benchmark": "lm_distill",
        "command": command,
        "quick": args.quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "distill": distill.__version__ if hasattr(distill, "__version__") else None},
        "wall_seconds": total,
        "cpu_seconds": total_cpu,
        "load_average_at_end": list(os.getloadavg()),
        "config": {k: v for k, v in spec.items()},
        "data": {"train_blocks": len(train_set), "val_blocks": len(val), "block": spec["block"],
                 "vocab": data.num_classes, "val_tokens": val.targets.numel()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    load = ", ".join(f"{x:.1f}" for x in result.get("load_average_at_end", []))
    lines = [
        "# Distilling a character-level GPT on Tiny Shakespeare",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU, "
        f"{m['threads']} torch thread(s), {m['cpus']}-CPU {m['processor']} ({m['platform']}), torch {m['torch']}, "
        f"{result['date']}." + (" **Quick smoke test: the numbers mean nothing.**" if result["quick"] else ""),
        "",
        f"Held-out set: the last 10 % of the text, {result['data']['val_blocks']} blocks "
        f"({result['data']['val_tokens']:,} characters). Perplexity is per character; agreement is "
        "the fraction of positions where the model's most probable next character is the teacher's. "
        "Teacher NLL of samples: the teacher's mean negative log-likelihood (nats per character) of "
        f"{result['config']['sample_new']} characters the model samples (T = 1) after each of "
        f"{result['config']['sample_prompts']} held-out {result['config']['sample_prompt_len']}-character "
        "prompts: how teacher-like the model's own text is (the teacher's row is its entropy rate). "
        "`CPU s` is the process's CPU time for training (1 thread: its compute time); `wall s` also "
        f"counts waiting for a core (load average at the end: {load}).",
        "",
        "| run | params | steps | val perplexity | accuracy % | agreement with teacher % | KL(teacher ‖ model) "
        "| teacher NLL of samples | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['run']} | {row['params']:,} | {row['steps']} | {row['perplexity']:.3f} | "
            f"{100 * row['accuracy']:.2f} | {100 * row['agreement']:.2f} | {row['kl_to_teacher']:.4f} | "
            f"{row['sample_teacher_nll']:.3f} | {row['train_cpu_seconds']:.0f} | {row['train_seconds']:.0f} |"
        )
    seq = next((r for r in result["rows"] if "generation_cpu_seconds" in r), None)
    if seq:
        lines += ["", f"Sequence-level KD: the teacher sampled {seq['sequences']} continuations (T = 1) "
                      f"in {seq['generation_cpu_seconds']:.0f} CPU s, not counted in its row."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
