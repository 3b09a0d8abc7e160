"""Sentence pairs with similarity scores (the STS benchmark) and rank correlation.

    splits = read_stsb("path/to/stsb")                   # {"train": SentencePairs, "dev": ..., "test": ...}
    rho = spearman(predicted_similarity, splits["test"].scores)

The STS benchmark (Cer et al. 2017, "SemEval-2017 Task 1: Semantic Textual Similarity"): 5,749
train, 1,500 dev and 1,379 test sentence pairs, each scored 0 (unrelated) to 5 (same meaning). The
usual metric for sentence embeddings is the Spearman rank correlation between the cosine
similarity of the two sentences' embeddings and the gold score.

Nothing here needs ``transformers``; :func:`register_stsb` adds the ``stsb`` data set (for
``task: sentence-embedding`` recipes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import DistillError

STSB_URL = "http://ixa2.si.ehu.es/stswiki/images/4/48/Stsbenchmark.tar.gz"
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
# the official pair counts: a file with another count is another version (or truncated)
STSB_COUNTS = {"train": 5749, "dev": 1500, "test": 1379}


@dataclass
class SentencePairs:
    """Pairs of sentences and their similarity: ``first[i]`` and ``second[i]`` scored ``scores[i]``
    (float32 ``[N]``; ``nan`` marks an unscored pair, e.g. two unlabelled sentences)."""

    first: list[str]
    second: list[str]
    scores: torch.Tensor

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)
        if not len(self.first) == len(self.second) == len(self.scores):
            raise DistillError(
                f"sentence pairs: {len(self.first)} first, {len(self.second)} second sentences and "
                f"{len(self.scores)} scores; they must be equal"
            )

    def __len__(self) -> int:
        return len(self.first)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "SentencePairs":
        index = torch.as_tensor(index, dtype=torch.long)
        picks = index.tolist()
        return SentencePairs([self.first[i] for i in picks], [self.second[i] for i in picks], self.scores[index])

    def sentences(self) -> list[str]:
        """Every sentence, interleaved: ``first[0], second[0], first[1], ...`` (``2N`` strings)."""
        return [s for pair in zip(self.first, self.second) for s in pair]

    @staticmethod
    def concat(parts: Sequence["SentencePairs"]) -> "SentencePairs":
        return SentencePairs(
            [s for p in parts for s in p.first], [s for p in parts for s in p.second],
            torch.cat([p.scores for p in parts]) if parts else torch.zeros(0),
        )

    @staticmethod
    def unscored(sentences: Sequence[str]) -> "SentencePairs":
        """Unlabelled sentences as unscored pairs (consecutive sentences paired; an odd last one is
        paired with the first)."""
        texts = list(sentences)
        if len(texts) % 2:
            texts.append(texts[0])
        n = len(texts) // 2
        return SentencePairs(texts[0::2], texts[1::2], torch.full((n,), math.nan))


def read_stsb_file(path: str | Path) -> SentencePairs:
    """One STS benchmark file: tab-separated ``genre, file, year, id, score, sentence1, sentence2``
    (columns after the seventh, present on some lines, are ignored; quotes are literal text)."""
    first, second, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 7:
                raise DistillError(f"{path}, line {number}: expected 7 tab-separated columns, got {len(cols)}")
            try:
                score = float(cols[4])
            except ValueError:
                raise DistillError(f"{path}, line {number}: the score {cols[4]!r} is not a number") from None
            first.append(cols[5].strip())
            second.append(cols[6].strip())
            scores.append(score)
    return SentencePairs(first, second, torch.tensor(scores, dtype=torch.float32))


def read_stsb(path: str | Path, verify: bool = True) -> dict[str, SentencePairs]:
    """The STS benchmark splits ``train``, ``dev``, ``test`` from a folder with ``sts-train.csv``,
    ``sts-dev.csv`` and ``sts-test.csv`` (the files of ``Stsbenchmark.tar.gz``). ``verify`` checks
    the official pair counts."""
    folder = Path(path).expanduser()
    missing = [name for name in STSB_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DistillError(
            f"STS-B folder '{folder}' lacks {', '.join(missing)}; unpack {STSB_URL} and point "
            "data.options.path at its stsbenchmark folder"
        )
    splits = {split: read_stsb_file(folder / name) for split, name in STSB_FILES.items()}
    if verify:
        for split, pairs in splits.items():
            if len(pairs) != STSB_COUNTS[split]:
                raise DistillError(
                    f"{folder / STSB_FILES[split]} has {len(pairs)} pairs, the official file {STSB_COUNTS[split]}; "
                    "pass verify=False (data.options.verify: false) for your own edited copy"
                )
    return splits


def read_sentences(path: str | Path) -> list[str]:
    """Unlabelled sentences from a text file: one per line, or a ``sentence<TAB>label`` file with
    a header (GLUE's SST-2 ``train.tsv``), whose first column is taken."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    if lines and lines[0].split("\t")[0] == "sentence":
        lines = [line.split("\t")[0] for line in lines[1:]]
    return [line.strip() for line in lines if line.strip()]


# -- rank correlation ---------------------------------------------------------------------------


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """float64 ``[N]``: the 1-based rank of each value, ties sharing the mean of their ranks
    (``[10, 20, 20, 30]`` -> ``[1, 2.5, 2.5, 4]``)."""
    values = torch.as_tensor(values).reshape(-1).double()
    n = len(values)
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    # runs of equal values: each run's ranks are start+1 .. end, their mean (start + end + 1) / 2
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).reshape(-1)
    ends = torch.cat([starts[1:], torch.tensor([n])])
    mean_rank = (starts + ends + 1).double() / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` vectors (``nan`` when either is constant)."""
    x = torch.as_tensor(x).reshape(-1).double()
    y = torch.as_tensor(y).reshape(-1).double()
    if x.shape != y.shape or len(x) < 2:
        raise DistillError(f"correlation needs two vectors of equal length >= 2, got {len(x)} and {len(y)}")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's on :func:`average_ranks` (ties averaged, as
    ``scipy.stats.spearmanr``)."""
    return pearson(average_ranks(x), average_ranks(y))


def similarity_correlations(first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """``spearman`` and ``pearson`` between the cosine similarity of embeddings ``first[i]`` and
    ``second[i]`` (``[N, D]`` each) and the gold ``scores`` ``[N]``."""
    cos = torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=-1)
    return {"spearman": spearman(cos, scores), "pearson": pearson(cos, scores)}


# -- the data set, by name ---------------------------------------------------------------------


def register_stsb() -> None:
    """Register the ``stsb`` data set (idempotent): ``path`` (a folder with ``sts-*.csv``; default
    ``DATA_DIR/stsb``) and ``verify``. Its splits are :class:`SentencePairs`: ``train`` (STS-B
    train), ``test`` (STS-B test) and ``extra["dev"]``."""
    from distill.data.registry import register_builder
    from distill.data.registry import DATASETS
    from distill.data.types import DataSplits

    if "stsb" in DATASETS:
        return

    @register_builder("stsb")
    def stsb(data_dir: Path, *, path: str | None = None, verify: bool = True) -> DataSplits:
        splits = read_stsb(path if path is not None else data_dir / "stsb", verify=verify)
        return DataSplits(name="stsb", train=splits["train"], test=splits["test"], num_classes=0,
                          input_shape=(), extra={"dev": splits["dev"]})


register_stsb()  # this module defines the `stsb` data set: importing it registers it
