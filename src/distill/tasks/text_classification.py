"""Text classification (``task: text-classification``): sentences in, one label each out.

Data sets (``data.name``):

- ``sst2``: GLUE SST-2 (:func:`distill.nlp.load_sst2`); ``data.options``: ``path`` (a folder with
  ``train.tsv`` and ``dev.tsv``, or ``SST-2.zip``; default: ``--data-dir``/sst2, downloaded),
  ``verify`` (SHA-256 of a given folder, default true). The test split is GLUE's dev set.
- ``tsv``: your own ``sentence<TAB>label`` files with a header line; ``data.options``: ``train``,
  ``test`` (paths), ``num_classes`` (default: the largest label + 1).

Models (``model:`` of teacher, student, assistants), each with its own tokenizer:

- ``hf``: a Hugging Face model with a sequence-classification head (:mod:`distill.nlp.hf`), either
  pretrained, ``kwargs: {name_or_path: FOLDER_OR_HUB_NAME}`` (its tokenizer comes from the same
  place; a fresh head of ``num_classes`` outputs is added when the checkpoint has none), or random,
  ``kwargs: {config: {model_type: bert, hidden_size: 192, ...}}``. ``tokenizer: FOLDER_OR_HUB_NAME``
  loads the tokenizer from elsewhere; a model built from a config without one uses the teacher's
  tokenizer (and its vocabulary size, unless the config sets ``vocab_size``). ``num_labels``
  overrides the number of outputs (default: the data's classes). Taps: ``hidden_states.<i>``,
  ``attentions.<i>``, ``logits`` (TinyBERT-style terms: :mod:`distill.nlp.layer_map`).
- ``bilstm``: :class:`distill.nlp.BiLSTMClassifier` (Tang et al. 2019) on a word-level vocabulary
  trained on the training sentences (``min_frequency``, ``max_vocab``, ``lowercase``), or on
  ``tokenizer: FOLDER_OR_HUB_NAME``; other kwargs go to the model (``embedding_dim``,
  ``hidden_size``, ``fc_size``, ``dropout``). Taps: ``embedding``, ``features``, ``hidden``, ``logits``.

Every batch holds each distinct tokenizer's ids under its own prefix (``teacher.input_ids``,
``student.input_ids``, ...; models sharing a tokenizer share one), and :func:`feed` gives each model
its own (see :class:`distill.nlp.TextFeed`). ``task_options``: ``max_length`` (tokens per sentence,
default 128), ``group_by_length`` (batches of similar lengths, default true). Metrics: accuracy
(primary), agreement with the teacher, KL(teacher ‖ student), ECE, as for classification.

A distilled ``hf`` student is also saved with its tokenizer as a Hugging Face folder,
``stages/student-seed<N>/hf/`` (:meth:`Task.save_pretrained`); ``distill export`` feeds the
student ``input_ids`` and ``attention_mask`` of the test sentences in its own tokenisation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from distill.data.registry import DataOptions, parse_data_options
from distill.data.splits import random_split, training_subset
from distill.errors import DistillError
from distill.signals import Batch
from distill.tasks.base import TASKS, Task, TaskOptions
from distill.metrics import classification_metrics

MODELS = ("hf", "bilstm")
DATA = ("sst2", "tsv")


class TextOptions(TaskOptions):
    """``task_options`` of text-classification."""

    max_length: int = Field(128, ge=1)  # tokens per sentence after truncation
    group_by_length: bool = True  # batches of similar lengths (less padding)


HF_KWARGS = ("name_or_path", "config", "tokenizer", "num_labels")
WORD_KWARGS = ("min_frequency", "max_vocab", "lowercase")
BILSTM_KWARGS = ("tokenizer", *WORD_KWARGS, "embedding_dim", "hidden_size", "fc_size", "dropout")


def feed(model: nn.Module, batch: Batch) -> Any:
    """``model(**inputs)`` with the model's own tokenisation (its ``text_side``, set when built)."""
    from distill.nlp.feed import TextFeed

    return TextFeed(getattr(model, "text_side", None))(model, batch)


def _side_key(side: str | None, key: str) -> str:
    return key if side is None else f"{side}.{key}"


# ------------------------------------------------------------------------------ data
class SST2Options(DataOptions):
    """``data.options`` of ``sst2``: ``path`` (a folder with ``train.tsv`` and ``dev.tsv``; default
    downloaded into the data folder) and ``verify`` (check the files' SHA-256)."""

    path: str | Path | None = None
    verify: bool = True


class TSVOptions(DataOptions):
    """``data.options`` of ``tsv``: ``train`` and ``test`` (``sentence<TAB>label`` files with a header
    line) and ``num_classes`` (default: the largest label + 1)."""

    train: str | Path
    test: str | Path
    num_classes: int | None = Field(None, ge=2)


DATA_OPTIONS: dict[str, type[DataOptions]] = {"sst2": SST2Options, "tsv": TSVOptions}


def load_text_data(spec, data_dir) -> Any:
    """The :class:`distill.nlp.TextSplits` of a recipe's ``data`` section (``sst2`` or ``tsv``)."""
    from distill.nlp.data import TextSplits, load_sst2, read_labelled_tsv

    if spec.name not in DATA_OPTIONS:
        raise DistillError(f"unknown data set '{spec.name}' for task text-classification; choose {' or '.join(DATA)}")
    options = DATA_OPTIONS[spec.name](**parse_data_options(spec.name, DATA_OPTIONS[spec.name], spec.options))
    if isinstance(options, SST2Options):
        if options.path is None:
            return load_sst2(data_dir=data_dir)
        return load_sst2(options.path, verify=options.verify)
    files = {k: Path(getattr(options, k)).expanduser() for k in ("train", "test")}
    for k, f in files.items():
        if not f.is_file():
            raise DistillError(f"data set 'tsv': {k} file {f} does not exist")
    train, test = read_labelled_tsv(files["train"]), read_labelled_tsv(files["test"])
    classes = options.num_classes or int(max(train.targets.max(), test.targets.max())) + 1
    return TextSplits("tsv", train, test, num_classes=int(classes))


def _tokenizer_source(spec, teacher_source: tuple | None, role: str) -> tuple:
    """What a model spec's tokenizer is: ``("hf", name_or_path)`` or ``("word", options...)``."""
    kwargs = spec.kwargs
    if spec.model == "hf":
        where = kwargs.get("tokenizer") or kwargs.get("name_or_path")
        if where is not None:
            return ("hf", str(where))
        if teacher_source is None:
            raise DistillError(
                f"{role} (model: hf from a config) has no tokenizer: set {role}.kwargs.tokenizer to a folder or hub "
                "name of a Hugging Face tokenizer (models built from a config otherwise use the teacher's)"
            )
        return teacher_source
    if spec.model == "bilstm":
        if kwargs.get("tokenizer") not in (None, "word"):
            return ("hf", str(kwargs["tokenizer"]))
        return ("word", kwargs.get("min_frequency", 1), kwargs.get("max_vocab"), kwargs.get("lowercase", True))
    raise DistillError(f"unknown model '{spec.model}' for task text-classification; choose {' or '.join(MODELS)}")


def _load_tokenizer(source: tuple, texts: list[str]):
    if source[0] == "word":
        from distill.nlp.data import word_tokenizer

        return word_tokenizer(texts, min_frequency=source[1], max_vocab=source[2], lowercase=source[3])
    from distill.nlp.hf import _source, require_transformers

    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(_source(source[1]))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"cannot load a tokenizer from '{source[1]}': {first}") from None


@dataclass
class PreparedText:
    """The data of a text-classification run: sentences, each model's tokenizer, loaders."""

    data: Any  # TextSplits
    train: Any  # TextDataset
    val: Any | None
    max_length: int
    group_by_length: bool
    eval_batch_size: int
    tokenizers: dict[str, Any] = field(default_factory=dict)  # side -> tokenizer
    sides: dict[tuple, str] = field(default_factory=dict)  # tokenizer source -> side
    teacher_source: tuple | None = None
    roles: dict[str, str] = field(default_factory=dict)  # spec_key -> teacher, student, ...
    role_sides: dict[str, str] = field(default_factory=dict)  # teacher, student, ... -> side
    _loaders: dict = field(default_factory=dict, repr=False)

    def side_of(self, spec, role: str = "model") -> str:
        """The batch prefix of ``spec``'s tokenizer, loading the tokenizer the first time."""
        source = _tokenizer_source(spec, self.teacher_source, role)
        if source not in self.sides:
            used = set(self.sides.values())
            side = role if role not in used else f"{role}{len(used)}"
            self.tokenizers[side] = _load_tokenizer(source, self.train.texts)
            self.sides[source] = side
        return self.sides[source]

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0):
        """A :class:`distill.nlp.TextLoader` of ``split`` with every side's tokenisation; the
        sentences are tokenised once per split and set of tokenizers."""
        from distill.nlp.data import TextLoader

        dataset = {"train": self.train, "val": self.val, "test": self.data.test}[split]
        key = (split, tuple(self.tokenizers))
        base = self._loaders.get(key)
        if base is None:
            base = TextLoader(dataset, dict(self.tokenizers), batch_size, shuffle=shuffle, seed=seed,
                              max_length=self.max_length, group_by_length=self.group_by_length)
            self._loaders[key] = base
        out = copy.copy(base)  # shares the encoded ids
        out.batch_size, out.shuffle, out.seed, out.epoch = batch_size, shuffle, int(seed), 0
        out.drop_last = shuffle and len(dataset) > batch_size
        out.group_by_length = self.group_by_length if shuffle else False
        return out

    @property
    def test_loader(self):
        return self.loader("test", self.eval_batch_size, shuffle=False)

    @property
    def val_loader(self):
        return None if self.val is None else self.loader("val", self.eval_batch_size, shuffle=False)


# ------------------------------------------------------------------------------ models
def spec_key(spec) -> str:
    """A model spec as stable text (which role a spec plays, for error messages)."""
    return json.dumps({"model": spec.model, **spec.kwargs}, sort_keys=True, default=str)


def _check_hf_kwargs(spec, role: str) -> None:
    kwargs = spec.kwargs
    unknown = sorted(set(kwargs) - set(HF_KWARGS))
    if unknown:
        raise DistillError(f"{role}.kwargs: model 'hf' has no option {', '.join(unknown)}; "
                           f"accepted: {', '.join(HF_KWARGS)}")
    if ("name_or_path" in kwargs) == ("config" in kwargs):
        raise DistillError(f"{role} (model: hf) needs exactly one of kwargs.name_or_path (a pretrained folder or "
                           "hub name) and kwargs.config (a transformers config, e.g. {model_type: bert, ...})")
    if "config" in kwargs and not isinstance(kwargs["config"], dict):
        raise DistillError(f"{role}.kwargs.config must be a mapping with a model_type")


def check_model_spec(spec, role: str) -> None:
    """Raise a :class:`DistillError` for a model spec this task cannot build (before any work)."""
    if spec.model == "hf":
        _check_hf_kwargs(spec, role)
    elif spec.model == "bilstm":
        unknown = sorted(set(spec.kwargs) - set(BILSTM_KWARGS))
        if unknown:
            raise DistillError(f"{role}.kwargs: model 'bilstm' has no option {', '.join(unknown)}; "
                               f"accepted: {', '.join(BILSTM_KWARGS)}")
    else:
        raise DistillError(f"unknown model '{spec.model}' for task text-classification; choose {' or '.join(MODELS)}")


def _pretrained_head(name_or_path: str, num_labels: int, data_classes: int, role: str) -> None:
    """Refuse a checkpoint whose classification head has another number of labels."""
    from distill.nlp.hf import _source, require_transformers

    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(_source(name_or_path))
    except (OSError, ValueError):
        return  # load_pretrained says what is wrong
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if heads and int(config.num_labels) != num_labels:
        wanted = (f"the data has {data_classes} classes" if num_labels == data_classes
                  else f"kwargs.num_labels asks for {num_labels}")
        raise DistillError(
            f"{role} '{name_or_path}' has a classification head of {config.num_labels} labels but {wanted}; "
            "teacher, student and data must share the label space (use a checkpoint without a head, or data "
            "with its labels)"
        )


def build_text_model(spec, prepared: PreparedText, seed: int, role: str = "model") -> nn.Module:
    """The model of ``spec`` for ``prepared``'s data, tagged with its tokenizer's side."""
    check_model_spec(spec, role)
    side = prepared.side_of(spec, role)
    tokenizer = prepared.tokenizers[side]
    kwargs = dict(spec.kwargs)
    classes = int(kwargs.pop("num_labels", prepared.data.num_classes))
    torch.manual_seed(seed)
    if spec.model == "hf":
        if "name_or_path" in kwargs:
            from distill.nlp.hf import load_pretrained

            _pretrained_head(kwargs["name_or_path"], classes, prepared.data.num_classes, role)
            model, _ = load_pretrained(kwargs["name_or_path"], num_labels=classes,
                                       tokenizer=kwargs.get("tokenizer"))
        else:
            from distill.nlp.hf import from_config

            config = dict(kwargs["config"])
            config.setdefault("vocab_size", len(tokenizer))
            if int(config["vocab_size"]) < len(tokenizer):
                raise DistillError(f"{role}.kwargs.config.vocab_size is {config['vocab_size']} but its tokenizer has "
                                   f"{len(tokenizer)} tokens; leave vocab_size out to take the tokenizer's")
            model = from_config(config, num_labels=classes, seed=seed)
    else:
        from distill.nlp.bilstm import BiLSTMClassifier

        options = {k: v for k, v in kwargs.items() if k not in ("tokenizer", *WORD_KWARGS)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model = BiLSTMClassifier(len(tokenizer), classes, padding_idx=int(pad), **options)
    if spec.weights is not None:
        from distill.models import load_weights

        load_weights(model, spec.weights)
    model.text_side = side
    return model


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and targets ``[N]`` of ``model`` over ``loader`` (eval mode, on CPU)."""
    from distill.nlp.feed import predict as text_predict

    return text_predict(model, loader, feed)


class _Fed(nn.Module):
    """``forward`` runs ``feed(model, batch)``: lets :func:`cpu_latency_ms` time a text model."""

    def __init__(self, model: nn.Module, batch: Batch) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.train(model.training)  # cpu_latency_ms puts the wrapper back in this mode

    def forward(self, _: torch.Tensor) -> Any:
        return feed(self.model, self.batch)


# ------------------------------------------------------------------------------ the task
@TASKS.register("text-classification")
class TextClassificationTask(Task):
    """Sentences with one label each (SST-2, your TSV files): accuracy, agreement, KL, ECE."""

    name = "text-classification"
    primary_metric = "accuracy"
    data_names = DATA
    feed = staticmethod(feed)
    teacher_cache = "tokens"
    Options = TextOptions

    def data_options(self, recipe) -> dict:
        """``sst2``'s or ``tsv``'s options, typed (:data:`DATA_OPTIONS`)."""
        return parse_data_options(recipe.data.name, DATA_OPTIONS[recipe.data.name], recipe.data.options)

    def validate(self, recipe) -> None:
        self.options(recipe)
        if recipe.teacher.ensemble is not None:
            raise DistillError("teacher.ensemble is not available for text-classification; use one teacher")
        for role, spec in (("teacher", recipe.teacher), ("student", recipe.student),
                           *((f"assistants.{i}", a) for i, a in enumerate(recipe.assistants))):
            check_model_spec(spec, role)
        kwargs = recipe.teacher.kwargs
        if recipe.teacher.model == "hf" and "config" in kwargs and "tokenizer" not in kwargs:
            raise DistillError("teacher (model: hf from a config) has no tokenizer: set teacher.kwargs.tokenizer to a "
                               "folder or hub name of a Hugging Face tokenizer")

    def prepare(self, recipe, data_dir) -> PreparedText:
        options = self.options(recipe)
        data = load_text_data(recipe.data, data_dir)
        spec = recipe.data
        train = training_subset(data.train, spec.train_subset, spec.seed)
        val = None
        if spec.val_fraction > 0:
            train, val = random_split(train, spec.val_fraction, spec.seed, "sentences")
        prepared = PreparedText(data, train, val, options.max_length, options.group_by_length,
                                spec.eval_batch_size)
        # the teacher's tokenizer first: models built from a config without one share it
        prepared.teacher_source = _tokenizer_source(recipe.teacher, None, "teacher")
        for role, model_spec in (("teacher", recipe.teacher), ("student", recipe.student),
                                 *((f"assistant{i + 1}", a) for i, a in enumerate(recipe.assistants))):
            prepared.roles.setdefault(spec_key(model_spec), role)
            prepared.role_sides[role] = prepared.side_of(model_spec, role)
        return prepared

    def describe(self, prepared: PreparedText) -> str:
        sides = ", ".join(f"{side} ({len(tok):,} tokens)" for side, tok in prepared.tokenizers.items())
        return (f"{prepared.data.name}: {len(prepared.train)} train"
                + (f", {len(prepared.val)} validation" if prepared.val is not None else "")
                + f", {len(prepared.data.test)} test sentences, {prepared.data.num_classes} classes; "
                f"tokenizers: {sides}")

    def train_loader(self, recipe, prepared: PreparedText, batch_size: int, seed: int, labelled_only: bool = False):
        return prepared.loader("train", batch_size, shuffle=True, seed=seed)

    # -- the token cache: the teacher's logits per sentence, its per-token taps packed --------
    def cache_batches(self, recipe, prepared: PreparedText, batch_size: int):
        return prepared.loader("train", batch_size, shuffle=False)

    def cache_token_mask(self, teacher: nn.Module):
        key = _side_key(getattr(teacher, "text_side", None), "attention_mask")
        return lambda batch: batch[key]

    def cache_fingerprint(self, recipe, prepared: PreparedText, teacher: nn.Module) -> dict:
        import hashlib

        side = getattr(teacher, "text_side", None)
        encoded = prepared.loader("train", 1, shuffle=False).sides[side]
        data = hashlib.sha256()
        for tensor in (encoded.flat, encoded.lengths, prepared.train.targets):
            data.update(f"{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
            data.update(tensor.contiguous().numpy().tobytes())
        tok = prepared.tokenizers[side]
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        tokenizer = {"class": type(tok).__name__, "vocab": sorted(vocab.items()), "max_length": prepared.max_length}
        return {"data": data.digest(), "tokenizer": tokenizer, "vocab": len(vocab) or None}

    def build_model(self, spec, prepared: PreparedText, seed: int) -> nn.Module:
        return build_text_model(spec, prepared, seed, role=prepared.roles.get(spec_key(spec), "model"))

    def check_models(self, teacher: nn.Module, student: nn.Module, prepared: PreparedText) -> None:
        from distill.tasks.classification import check_label_space

        batch = prepared.loader("test", 2, shuffle=False).collate(torch.arange(min(2, len(prepared.data.test))))
        check_label_space(teacher, student, batch, feed, prepared.data)

    def reference(self, teacher: nn.Module, prepared: PreparedText) -> torch.Tensor:
        return predict(teacher, prepared.test_loader)[0]

    def evaluate(self, model, prepared: PreparedText, reference=None, split: str = "test") -> dict[str, float]:
        loader = prepared.test_loader if split == "test" else prepared.val_loader
        logits, targets = predict(model, loader)
        return classification_metrics(logits, targets, reference if split == "test" else None)

    def _student_inputs(self, prepared: PreparedText, batch: Batch) -> dict[str, torch.Tensor]:
        """The student's ``input_ids`` and ``attention_mask`` ``[b, T]`` of a test batch (what an
        exported student takes; single sentences have all-zero token types, which models default to)."""
        from distill.nlp.feed import TextFeed

        inputs = TextFeed(prepared.role_sides.get("student")).inputs(batch)
        return {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}

    def example_inputs(self, prepared: PreparedText, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` test sentences in the student's tokenisation: ``input_ids`` and
        ``attention_mask`` int64 ``[n, T]``, padded to the longest."""
        count = min(n, len(prepared.data.test))
        batch = prepared.loader("test", max(count, 1), shuffle=False).collate(torch.arange(count))
        return self._student_inputs(prepared, batch)

    def profile_input(self, model: nn.Module, prepared: PreparedText) -> dict[str, torch.Tensor]:
        """The first test sentence in ``model``'s own tokenisation (teacher and student may differ)."""
        from distill.nlp.feed import TextFeed

        batch = prepared.loader("test", 1, shuffle=False).collate(torch.tensor([0]))
        inputs = TextFeed(getattr(model, "text_side", None)).inputs(batch)
        return {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}

    def labelled_test_batches(self, prepared: PreparedText):
        return ({"input": self._student_inputs(prepared, b), "target": b["target"]} for b in prepared.test_loader)

    def tokenizer_of(self, model: nn.Module, prepared: PreparedText) -> Any:
        return prepared.tokenizers.get(getattr(model, "text_side", None))

    def latency_ms(self, model: nn.Module, prepared: PreparedText, repeats: int) -> float | None:
        """Median ms of one test sentence (the first) at batch 1, each model on its own tokens;
        Hugging Face models with SDPA attention (attention taps switch them to eager)."""
        from distill.measure import cpu_latency_ms

        batch = prepared.loader("test", 1, shuffle=False).collate(torch.tensor([0]))
        inner = getattr(model, "model", None)
        config = getattr(inner, "config", None)
        before = getattr(config, "_attn_implementation", None)
        switched = False
        if before == "eager" and hasattr(inner, "set_attn_implementation"):
            try:
                inner.set_attn_implementation("sdpa")
                switched = True
            except (ValueError, ImportError):
                pass
        try:
            return cpu_latency_ms(_Fed(model, batch), torch.zeros(1), repeats=repeats)
        finally:
            if switched:
                inner.set_attn_implementation(before)
