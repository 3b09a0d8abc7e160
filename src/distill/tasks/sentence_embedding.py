"""Sentence embeddings: a recipe's models map sentences to ``[B, D]`` vectors, scored on STS-B.

A training batch is a run of sentence pairs, interleaved (built by :class:`PairLoader`):

    {"input_ids": [2B, T], "attention_mask": [2B, T], "target": float [B], "index": [2B]}

rows ``2i`` and ``2i + 1`` are pair ``i``'s sentences, ``target`` its gold similarity (0-5, ``nan``
for unlabelled sentences paired up), ``index`` the sentences' numbers (pair ``p``'s are ``2p`` and
``2p + 1``), by which a teacher cache looks them up. Teacher and student read the same tokenisation (the
teacher's tokenizer), so one :class:`distill.nlp.feed.TextFeed` feeds both, and their outputs, the
sentence embeddings, are the ``logits`` tap:

- the distilled student matches the teacher's embedding of every sentence (``embedding_cosine``,
  and/or ``hint``: MSE), optionally its hidden states (``hint`` on ``hidden_states.<i>``);
- the **student alone** (the baseline stage) learns from the gold scores of the labelled pairs
  (``pair_cosine``: sentence-transformers' cosine-similarity regression on STS-B train), with no
  teacher; it starts from the same initialisation as the distilled student (e.g. the teacher's
  own layers, or the teacher's per-token vectors for a static student), so the comparison isolates
  what the teacher's embeddings add over the labels.

Metrics: ``spearman`` (primary) and ``pearson`` between the cosine similarity of each test pair's
embeddings and the gold score (STS-B test; ``val``: STS-B dev), and for students whose embedding
has the teacher's width, ``agreement``: the mean cosine between the student's and the teacher's
embedding of the test sentences.

Models (``model:`` in a recipe):

- ``hf``: a Hugging Face encoder as a :class:`distill.nlp.sentence.SentenceEncoder` (mean
  pooling, normalised). ``kwargs``: ``name_or_path`` (a local folder or hub name) or ``config``
  (a dict with ``model_type``, built randomly initialised), ``layers`` (keep only these 0-based
  transformer layers of a pretrained model, e.g. ``[0, 5]``; without ``name_or_path`` and
  ``config``, of the pretrained teacher), ``normalize`` (default true). A
  teacher given as ``weights: FOLDER`` (a Hugging Face folder or hub name) is loaded from there:
  the same as ``kwargs.name_or_path`` with ``pretrained: true``. ``weights`` naming a file
  (``.safetensors``, e.g. a finished run's student) loads those weights into the built model.
- ``static-embedding``: a :class:`distill.nlp.sentence.StaticEmbedding` over the tokenizer's
  vocabulary. ``kwargs``: ``init`` (``teacher``: each token's vector is the teacher's output for
  that token alone, as Model2Vec does; ``random``), ``dim`` (default: the teacher's width; smaller
  keeps the leading principal components), ``sif`` (e.g. ``0.001``: scale each token's initial
  vector by its smooth inverse frequency in the training sentences), ``normalize``. The special
  tokens (``[CLS]``, ``[SEP]``, ``[UNK]``, ...) are left out of the mean, as Model2Vec does, and
  the distilled table is also saved as a Model2Vec folder, ``stages/student-seed<N>/model2vec/``
  (``model2vec.StaticModel.from_pretrained`` gives the same embeddings).

Data: ``stsb`` (``data.options``: ``path``, a folder with ``sts-{train,dev,test}.csv``, default
``DATA_DIR/stsb``; ``verify``). Task options (``task_options``): ``tokenizer`` (a folder or hub name; default the teacher's source), ``max_length`` (128),
``extra_sentences`` (text files of unlabelled sentences, one per line, or GLUE-style
``sentence<TAB>label`` files, added to the training set as unscored pairs: only the distilled
student learns from them), ``max_extra`` (how many of them, default all), ``validation`` (true:
STS-B dev is the validation split, for early stopping on ``val_spearman``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from distill.data.loader import derive_seed
from distill.errors import DistillError
from distill.nlp.feed import TextFeed
from distill.nlp.stsb import SentencePairs, read_sentences, similarity_correlations
from distill.tasks.base import TASKS, Task, TaskOptions




class SentenceOptions(TaskOptions):
    """``task_options`` of sentence-embedding."""

    tokenizer: str | None = None  # a folder or hub name; default: the teacher's source
    max_length: int = Field(128, ge=1)
    extra_sentences: str | list[str] = []  # files of unlabelled sentences (one per line) added to training
    max_extra: int | None = Field(None, ge=0)
    validation: bool = False  # score early stopping on STS-B dev




class PairLoader:
    """Batches of sentence pairs for :class:`distill.Trainer`: ``batch_size`` pairs (``2 *
    batch_size`` sentences, interleaved) per batch, each padded to its longest sentence.

    Sentences are tokenised once (by :class:`distill.nlp.data.TextLoader`'s encoder). Order is
    deterministic in ``(seed, epoch)``; under ``world_size`` processes rank ``r`` takes every
    ``world_size``-th pair of each global batch.
    """

    def __init__(self, pairs: SentencePairs, tokenizer: Any, batch_size: int, *, shuffle: bool, seed: int = 0,
                 max_length: int = 128, drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        from distill.nlp.data import TextDataset, TextLoader

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistillError(f"batch size must be a positive integer, got {batch_size!r}")
        self.pairs = pairs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        sentences = pairs.sentences()
        self._sentences = TextLoader(TextDataset(sentences, torch.zeros(len(sentences), dtype=torch.long)),
                                     tokenizer, 1, shuffle=False, max_length=max_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.pairs)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def collate(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of pairs ``index`` (int64 ``[b]``)."""
        sentences = torch.stack([2 * index, 2 * index + 1], 1).reshape(-1)
        batch = self._sentences.collate(sentences)
        batch["target"] = self.pairs.scores[index]
        batch["index"] = sentences  # one per row: the teacher cache's key
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistillError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        n = len(self.pairs)
        generator = torch.Generator().manual_seed(derive_seed("pair-order", self.seed, self.epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for k in range(len(self)):
            yield self.collate(order[k * self.batch_size:(k + 1) * self.batch_size][self.rank::self.world_size])


@dataclass
class PreparedSentences:
    """What :meth:`SentenceEmbeddingTask.prepare` loads once for a run."""

    train: SentencePairs  # STS-B train pairs, then unlabelled sentences as unscored pairs
    test: SentencePairs
    dev: SentencePairs
    tokenizer: Any
    max_length: int
    eval_batch_size: int
    teacher_spec: Any  # the recipe's teacher (a static student is initialised from it)
    val_loader: object | None = None
    cache: dict = field(default_factory=dict)  # the loaded teacher and its token vectors, built once


def _pretrained_source(spec) -> str | None:
    """Where a model spec's pretrained weights come from: ``kwargs.name_or_path``, or ``weights``
    when it names a folder or a hub name rather than a weights file."""
    source = spec.kwargs.get("name_or_path")
    if source is None and spec.weights is not None and not _is_weights_file(spec.weights):
        source = spec.weights
    return None if source is None else str(source)


def _is_weights_file(path: str) -> bool:
    return Path(os.path.expanduser(path)).is_file() or str(path).endswith((".safetensors", ".pt", ".pth", ".bin"))


@TASKS.register("sentence-embedding")
class SentenceEmbeddingTask(Task):
    """Sentences in, unit-length embeddings out; Spearman on STS-B test (see the module doc)."""

    name = "sentence-embedding"
    primary_metric = "spearman"
    label_term = {"name": "pairs", "loss": "pair_cosine"}
    teacher_cache = "tokens"
    feed = TextFeed()

    # -- data -----------------------------------------------------------------------------------
    Options = SentenceOptions

    def validate(self, recipe) -> None:
        self.options(recipe)

    def prepare(self, recipe, data_dir) -> PreparedSentences:
        from distill.data import load_dataset
        from distill.nlp.hf import require_transformers

        options = self.options(recipe)
        data = load_dataset(recipe.data.name, data_dir, **recipe.data.options)
        if not isinstance(data.train, SentencePairs):
            raise DistillError(
                f"data set '{recipe.data.name}' holds no sentence pairs; task 'sentence-embedding' needs one such as stsb"
            )
        train = data.train
        if recipe.data.train_subset is not None and recipe.data.train_subset < len(train):
            gen = torch.Generator().manual_seed(recipe.data.seed + 7919)
            train = train.subset(torch.randperm(len(train), generator=gen)[: recipe.data.train_subset])
        extra_files = options.extra_sentences
        if isinstance(extra_files, str):
            extra_files = [extra_files]
        held_out = set(data.test.first) | set(data.test.second)
        extra = [s for f in extra_files for s in read_sentences(f) if s not in held_out]
        if options.max_extra is not None:
            extra = extra[: options.max_extra]
        if extra:
            train = SentencePairs.concat([train, SentencePairs.unscored(extra)])
        source = options.tokenizer or _pretrained_source(recipe.teacher)
        if source is None:
            raise DistillError(
                "task 'sentence-embedding' needs a tokenizer: set task_options.tokenizer (a folder or hub name), or "
                "give the teacher as a pretrained model (teacher.weights or teacher.kwargs.name_or_path)"
            )
        transformers = require_transformers()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(str(source)))
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot load the tokenizer '{source}': {str(exc).strip().splitlines()[0]}") from None
        prepared = PreparedSentences(
            train=train, test=data.test, dev=data.extra.get("dev", data.test), tokenizer=tokenizer,
            max_length=options.max_length, eval_batch_size=recipe.data.eval_batch_size,
            teacher_spec=recipe.teacher,
        )
        if options.validation:
            prepared.val_loader = prepared.dev
        return prepared

    def describe(self, prepared: PreparedSentences) -> str:
        scored = int((~torch.isnan(prepared.train.scores)).sum())
        return (f"{len(prepared.train)} training pairs ({scored} scored, {2 * (len(prepared.train) - scored)} "
                f"unlabelled sentences), {len(prepared.test)} test pairs")

    def train_loader(self, recipe, prepared: PreparedSentences, batch_size: int, seed: int, labelled_only: bool = False) -> PairLoader:
        return PairLoader(prepared.train, prepared.tokenizer, batch_size, shuffle=True, seed=seed,
                          max_length=prepared.max_length, drop_last=len(prepared.train) > batch_size)

    # -- the token cache: the teacher's embedding of every training sentence, its per-token taps packed
    def cache_size(self, prepared: PreparedSentences) -> int:
        return 2 * len(prepared.train)  # two sentences per pair, numbered by the batches' "index"

    def cache_batches(self, recipe, prepared: PreparedSentences, batch_size: int) -> PairLoader:
        return PairLoader(prepared.train, prepared.tokenizer, batch_size, shuffle=False,
                          max_length=prepared.max_length)

    def cache_token_mask(self, teacher: nn.Module):
        return lambda batch: batch["attention_mask"]

    def cache_fingerprint(self, recipe, prepared: PreparedSentences, teacher: nn.Module) -> dict:
        import hashlib

        data = hashlib.sha256()
        for sentence in prepared.train.sentences():
            data.update(sentence.encode() + b"\0")
        tok = prepared.tokenizer
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        tokenizer = {"class": type(tok).__name__, "vocab": sorted(vocab.items()), "max_length": prepared.max_length}
        return {"data": data.digest(), "tokenizer": tokenizer, "vocab": len(vocab) or None}

    # -- models ---------------------------------------------------------------------------------
    def build_model(self, spec, prepared: PreparedSentences, seed: int) -> nn.Module:
        from distill.models.weights import load_weights

        torch.manual_seed(seed)
        kwargs = dict(spec.kwargs)
        if spec.model == "hf":
            model = self._build_hf(spec, kwargs, seed, prepared)
        elif spec.model == "static-embedding":
            model = self._build_static(kwargs, prepared)
        else:
            raise DistillError(
                f"task 'sentence-embedding' builds models 'hf' and 'static-embedding', not '{spec.model}'"
            )
        if spec.weights is not None and _is_weights_file(spec.weights) and _pretrained_source(spec) != spec.weights:
            load_weights(model, spec.weights)
        return model

    @staticmethod
    def _build_hf(spec, kwargs: dict, seed: int, prepared: PreparedSentences) -> nn.Module:
        from distill.nlp.hf import from_config
        from distill.nlp.sentence import SentenceEncoder, keep_layers, load_sentence_encoder

        normalize = bool(kwargs.pop("normalize", True))
        layers = kwargs.pop("layers", None)
        config = kwargs.pop("config", None)
        kwargs.pop("name_or_path", None)
        source = _pretrained_source(spec)
        if source is None and config is None and layers is not None:  # a subset of the teacher's own layers
            source = _pretrained_source(prepared.teacher_spec)
        if (source is None) == (config is None):
            raise DistillError("model 'hf' needs exactly one of kwargs.name_or_path (or weights: FOLDER) and kwargs.config")
        if source is not None:
            model, _ = load_sentence_encoder(source, normalize=normalize, **kwargs)
            if layers is not None:
                model = SentenceEncoder(keep_layers(model.model, layers), normalize=normalize)
            return model
        if kwargs:
            raise DistillError(f"model 'hf' from a config takes no option {', '.join(map(repr, kwargs))}")
        bare = from_config(config, task="base", seed=seed).model
        if layers is not None:
            bare = keep_layers(bare, layers)
        return SentenceEncoder(bare, normalize=normalize)

    def _build_static(self, kwargs: dict, prepared: PreparedSentences) -> nn.Module:
        from distill.nlp.sentence import StaticEmbedding, sif_weights, token_vectors

        init = kwargs.pop("init", "teacher")
        dim = kwargs.pop("dim", None)
        sif = kwargs.pop("sif", None)
        normalize = bool(kwargs.pop("normalize", True))
        if kwargs:
            raise DistillError(f"model 'static-embedding' has no option {', '.join(map(repr, kwargs))}; "
                               "it takes init, dim, sif, normalize")
        tok = prepared.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if init == "random":
            return StaticEmbedding(len(tok), int(dim or 256), padding_idx=int(pad), normalize=normalize,
                                   skip_ids=tok.all_special_ids)
        if init != "teacher":
            raise DistillError(f"static-embedding init must be 'teacher' or 'random', got {init!r}")
        if "token_vectors" not in prepared.cache:  # the teacher runs over the vocabulary once per run
            teacher = self.build_model(prepared.teacher_spec, prepared, 0)
            prepared.cache["token_vectors"] = token_vectors(teacher, tok)
        weights = None
        if sif:  # frequent tokens of the training sentences start with less weight in the mean
            if "token_counts" not in prepared.cache:
                ids = tok(prepared.train.sentences(), truncation=True, max_length=prepared.max_length)["input_ids"]
                flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
                prepared.cache["token_counts"] = torch.bincount(flat, minlength=len(tok))
            weights = sif_weights(prepared.cache["token_counts"], float(sif))
        return StaticEmbedding.from_vectors(prepared.cache["token_vectors"], tok, normalize=normalize,
                                            dim=None if dim is None else int(dim), token_weights=weights)

    def check_models(self, teacher: nn.Module, student: nn.Module, prepared: PreparedSentences) -> None:
        vocab = len(prepared.tokenizer)
        for role, model in (("teacher", teacher), ("student", student)):
            size = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(model, "vocab_size", None)
            if isinstance(size, int) and size < vocab:
                raise DistillError(
                    f"the {role} has {size} token embeddings but the tokenizer {vocab} tokens; teacher and student "
                    "read the same tokenisation (data.options.tokenizer)"
                )

    def tokenizer_of(self, model: nn.Module, prepared: PreparedSentences) -> Any:
        return prepared.tokenizer

    def save_pretrained(self, model: nn.Module, prepared: PreparedSentences, stage_dir: Path) -> Path | None:
        """A static student as a Model2Vec folder ``model2vec/`` (``model2vec.StaticModel.from_pretrained``
        loads it; it keeps ``max_length`` tokens per sentence, as the run did); an ``hf`` student
        as a Hugging Face folder ``hf/`` of the bare encoder (``AutoModel``; mean-pool its last
        hidden states over the real tokens for the embedding) with the tokenizer."""
        from distill.nlp.sentence import StaticEmbedding

        if isinstance(model, StaticEmbedding):
            tok = prepared.tokenizer
            kept = prepared.max_length - tok.num_special_tokens_to_add()  # distill counts [CLS] and [SEP]
            return model.save_model2vec(Path(stage_dir) / "model2vec", tok, max_length=kept,
                                        base_model=getattr(tok, "name_or_path", None) or None)
        return super().save_pretrained(model, prepared, stage_dir)

    # -- evaluation -----------------------------------------------------------------------------
    def _embed_pairs(self, model: nn.Module, pairs: SentencePairs, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        from distill.nlp.sentence import embed

        size = min(prepared.eval_batch_size, 256)
        vectors = embed(model, prepared.tokenizer, pairs.sentences(), batch_size=size, max_length=prepared.max_length)
        return vectors[0::2], vectors[1::2]

    def reference(self, teacher: nn.Module, prepared: PreparedSentences) -> tuple[torch.Tensor, torch.Tensor]:
        return self._embed_pairs(teacher, prepared.test, prepared)

    def evaluate(self, model: nn.Module, prepared: PreparedSentences, reference=None, split: str = "test") -> dict[str, float]:
        pairs = prepared.test if split == "test" else prepared.dev
        first, second = self._embed_pairs(model, pairs, prepared)
        metrics = similarity_correlations(first, second, pairs.scores)
        if reference is not None and split == "test" and reference[0].shape == first.shape:
            cos = torch.nn.functional.cosine_similarity(torch.cat([first, second]), torch.cat(reference), dim=-1)
            metrics["agreement"] = float(cos.mean())
        return metrics

    def example_inputs(self, prepared: PreparedSentences, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` test sentences (pairs' first, then second sentences), tokenised as in
        training: ``input_ids`` and ``attention_mask`` int64 ``[n, T]``, padded to the longest."""
        sentences = (list(prepared.test.first) + list(prepared.test.second))[:max(n, 1)]
        encoded = prepared.tokenizer(sentences, truncation=True, max_length=prepared.max_length, padding=True,
                                     return_tensors="pt")
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}

    def latency_input(self, prepared: PreparedSentences) -> torch.Tensor:
        ids = prepared.tokenizer([prepared.test.first[0]], truncation=True, max_length=prepared.max_length,
                                 return_tensors="pt")["input_ids"]
        return ids  # one sentence: [1, T]
