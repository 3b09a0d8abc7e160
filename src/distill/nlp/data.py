"""Text data: labelled sentences, SST-2, and a loader that tokenises them for each model.

    splits = load_sst2()                                   # downloads and verifies GLUE SST-2
    loader = TextLoader(splits.train, {"student": student_tok, "teacher": teacher_tok},
                        batch_size=32, shuffle=True, group_by_length=True)

Sentences are kept as text; each model's tokenizer turns them into ids once, when the loader is
built, and every batch is padded to its longest sentence. With one tokenizer (``tokenizers=tok``)
batches hold ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes
them); with a dict of tokenizers each side's tensors are prefixed by its name
(``student.input_ids``, ``teacher.input_ids``, ...) for :class:`distill.nlp.feed.TextFeed`.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.data.download import download, publish_file, sha256_of
from distill.data.loader import derive_seed
from distill.data.registry import default_data_dir
from distill.errors import DistillError


@dataclass
class TextDataset:
    """Sentences and their labels: ``texts`` (``N`` strings), ``targets`` int64 ``[N]``."""

    texts: list[str]
    targets: torch.Tensor

    def __post_init__(self) -> None:
        self.targets = torch.as_tensor(self.targets, dtype=torch.long)
        if len(self.texts) != len(self.targets):
            raise DistillError(f"{len(self.texts)} texts but {len(self.targets)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "TextDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return TextDataset([self.texts[i] for i in index.tolist()], self.targets[index])


@dataclass
class TextSplits:
    """A text classification data set: train and test splits (``test`` is GLUE's dev set for SST-2,
    whose test labels are not public)."""

    name: str
    train: TextDataset
    test: TextDataset
    num_classes: int
    class_names: list[str] | None = None
    extra: dict = field(default_factory=dict)


# --- SST-2 ---------------------------------------------------------------------------------------

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
# SHA-256 of the two files inside the zip. Their MD5s equal the published GLUE values
# (train da409a0a939379ed32a470bc0f7fe99a, dev 268856b487b2a31a28c0a93daaff7288, as in torchtext);
# the files are checked, not the zip, so a re-packed archive of the same files verifies too.
SST2_FILES = {
    "train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
}


def read_labelled_tsv(path: str | Path) -> TextDataset:
    """A ``sentence<TAB>label`` file with a header line (the GLUE SST-2 format)."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:1] != ["sentence"] or header[-1:] != ["label"]:
            first = "\t".join(header)
            shown = repr(first[:60]) + ("..." if len(first) > 60 else "")
            raise DistillError(
                f"{path}: the first line must be the header 'sentence<TAB>label' (add it above the rows), got {shown}"
            )
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            sentence, _, label = line.rpartition("\t")
            if not label.strip().isdigit():
                raise DistillError(f"{path}, line {number}: the label {label!r} is not an integer")
            texts.append(sentence.strip())
            labels.append(int(label))
    return TextDataset(texts, torch.tensor(labels, dtype=torch.long))


def _extract_sst2(archive: Path, dest: Path) -> None:
    """Extract ``SST-2/train.tsv`` and ``SST-2/dev.tsv`` from ``archive`` into ``dest``, verified."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = sorted((n for n in zf.namelist() if not n.endswith("/")), key=lambda n: -n.count("/"))
            names = {Path(n).name: n for n in members}  # the shallowest of equal names wins
            for name, sha in SST2_FILES.items():
                if name not in names:
                    raise DistillError(f"{archive} has no {name}; is it GLUE's SST-2.zip?")
                fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out, zf.open(names[name]) as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    actual = sha256_of(tmp)
                    if actual != sha:
                        raise DistillError(
                            f"{name} in {archive} has sha256 {actual}, expected {sha}: the archive is corrupt "
                            "or another version"
                        )
                    publish_file(tmp, dest / name)
                finally:
                    Path(tmp).unlink(missing_ok=True)
    except zipfile.BadZipFile:
        raise DistillError(f"{archive} is not a zip file; delete it and download again") from None


def load_sst2(
    path: str | Path | None = None,
    data_dir: str | Path | None = None,
    url: str = SST2_URL,
    verify: bool = True,
) -> TextSplits:
    """GLUE SST-2 (Socher et al. 2013): 67,349 training sentences, 872 test sentences (GLUE's dev
    split), labels 0 = negative, 1 = positive.

    ``path`` is a folder with ``train.tsv`` and ``dev.tsv``, or the ``SST-2.zip`` archive. Without it
    the files are looked for in ``data_dir/sst2`` (``data_dir`` defaults to ``$DISTILL_DATA`` or
    ``~/.cache/distill/data``) and downloaded from ``url`` when missing; downloaded files are
    verified by SHA-256, and so are files in ``path`` unless ``verify=False`` (your own edited copy).
    """
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file() and zipfile.is_zipfile(path):
            with tempfile.TemporaryDirectory(prefix="sst2-") as tmp:
                _extract_sst2(path, Path(tmp))  # verifies
                return _read_sst2(Path(tmp), verify=False)
        if not path.is_dir():
            raise DistillError(f"SST-2 path '{path}' is neither a folder with train.tsv and dev.tsv nor SST-2.zip")
        return _read_sst2(path, verify)
    folder = (Path(data_dir).expanduser() if data_dir else default_data_dir()) / "sst2"
    if any(not (folder / n).exists() or sha256_of(folder / n) != sha for n, sha in SST2_FILES.items()):
        folder.mkdir(parents=True, exist_ok=True)
        archive = download(url, folder / "SST-2.zip", sha256=None)  # the files inside are verified
        try:
            _extract_sst2(archive, folder)
        finally:
            archive.unlink(missing_ok=True)
    return _read_sst2(folder, verify=False)  # verified above


def _read_sst2(folder: Path, verify: bool) -> TextSplits:
    for name, sha in SST2_FILES.items():
        file = folder / name
        if not file.exists():
            raise DistillError(f"SST-2 folder '{folder}' has no {name}")
        if verify and sha256_of(file) != sha:
            raise DistillError(
                f"{file} differs from GLUE's SST-2 {name} (sha256); pass verify=False to use your own copy"
            )
    train, test = read_labelled_tsv(folder / "train.tsv"), read_labelled_tsv(folder / "dev.tsv")
    return TextSplits("sst2", train, test, num_classes=2, class_names=["negative", "positive"])


# --- tokenisation and batches --------------------------------------------------------------------

@dataclass
class _Encoded:
    """One tokenizer's ids for a whole data set: concatenated, with each sentence's start and length."""

    flat: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    pad_id: int
    token_types: bool


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> _Encoded:
    """Token ids of every text with ``tokenizer`` (a Hugging Face tokenizer), truncated to ``max_length``."""
    if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
        raise DistillError(
            f"a {type(tokenizer).__name__} is not a Hugging Face tokenizer; wrap a tokenizers.Tokenizer as "
            "transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]')"
        )
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if len(ids) and int(lengths.min()) == 0:
        empty = int((lengths == 0).nonzero()[0])
        raise DistillError(f"text {empty} ({texts[empty]!r}) has no tokens with this tokenizer")
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return _Encoded(flat, starts, lengths, int(pad), types)


def _pad(encoded: _Encoded, index: torch.Tensor) -> dict[str, torch.Tensor]:
    lengths = encoded.lengths[index]
    width = int(lengths.max()) if len(index) else 0
    positions = torch.arange(width)
    mask = positions[None, :] < lengths[:, None]
    gather = (encoded.starts[index][:, None] + positions[None, :]).clamp_max(max(len(encoded.flat) - 1, 0))
    ids = torch.where(mask, encoded.flat[gather], torch.full_like(gather, encoded.pad_id))
    out = {"input_ids": ids, "attention_mask": mask.long()}
    if encoded.token_types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


class TextLoader:
    """Batches of a :class:`TextDataset` as dicts of token tensors, ``target`` and ``index``.

    ``tokenizers`` is one tokenizer (plain keys ``input_ids``, ``attention_mask``,
    ``token_type_ids`` when it makes them) or ``{side: tokenizer}`` (keys ``"<side>.input_ids"``
    etc.; sides with the same tokenizer object share one encoding). Every tensor is int64
    ``[b, T]``, ``T`` the longest sentence of the batch after truncation to ``max_length`` tokens.

    Order follows the batch loader's contract (:class:`distill.data.BatchLoader`): epoch ``e``'s
    permutation comes from ``(seed, e)`` only and rank ``r`` of ``world_size`` takes its
    ``[r::world_size]`` slice of each global batch. ``group_by_length`` sorts each run of 50
    batches by length and shuffles the batches, so little of a batch is padding (on CPU the cost is
    about proportional to the padded tokens).
    """

    GROUP = 50  # batches per length-sorted run

    def __init__(
        self,
        dataset: TextDataset,
        tokenizers: Any | Mapping[str, Any],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        max_length: int = 128,
        drop_last: bool = False,
        group_by_length: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistillError(f"batch size must be a positive integer, got {batch_size!r}")
        if max_length < 1:
            raise DistillError(f"max_length must be >= 1, got {max_length}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        sides = dict(tokenizers) if isinstance(tokenizers, Mapping) else {None: tokenizers}
        if not sides:
            raise DistillError("give at least one tokenizer")
        encoded: dict[int, _Encoded] = {}
        self.sides: dict[str | None, _Encoded] = {}
        for side, tok in sides.items():
            if id(tok) not in encoded:
                encoded[id(tok)] = encode_texts(tok, dataset.texts, max_length)
            self.sides[side] = encoded[id(tok)]
        self._lengths = torch.stack([e.lengths for e in self.sides.values()]).amax(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int | None = None) -> list[torch.Tensor]:
        """The global batches (sample indices) of ``epoch`` (default: the current one)."""
        n, size = len(self.dataset), self.batch_size
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(derive_seed("text-order", self.seed, epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.group_by_length:
            runs = []
            for start in range(0, n, size * self.GROUP):
                run = order[start:start + size * self.GROUP]
                runs.append(run[torch.argsort(self._lengths[run], descending=True, stable=True)])
            order = torch.cat(runs) if runs else order
        batches = [order[k * size:(k + 1) * size] for k in range(len(self))]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def collate(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of samples ``index`` (int64 ``[b]``)."""
        batch: dict[str, torch.Tensor] = {}
        done: dict[int, dict[str, torch.Tensor]] = {}
        for side, encoded in self.sides.items():
            if id(encoded) not in done:
                done[id(encoded)] = _pad(encoded, index)
            for key, value in done[id(encoded)].items():
                batch[key if side is None else f"{side}.{key}"] = value
        batch["target"] = self.dataset.targets[index]
        batch["index"] = index
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistillError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        for global_index in self.batches():
            yield self.collate(global_index[self.rank::self.world_size])


def word_tokenizer(texts: Sequence[str], *, min_frequency: int = 1, max_vocab: int | None = None,
                   lowercase: bool = True):
    """A word-level tokenizer trained on ``texts`` (whitespace and punctuation split), as a
    ``transformers.PreTrainedTokenizerFast`` with ``[PAD]`` = 0 and ``[UNK]`` = 1: the vocabulary of
    a small student that need not share the teacher's (e.g. a BiLSTM, Tang et al. 2019)."""
    from distill.nlp.hf import require_transformers

    transformers = require_transformers()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=(max_vocab or 1 << 30), min_frequency=min_frequency, special_tokens=["[PAD]", "[UNK]"]
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_input_names=["input_ids", "attention_mask"]
    )


class TextCollator:
    """Turns a list of ``{"text": str, "label": int}`` examples into a batch tokenised by each
    side's tokenizer, as :class:`TextLoader` does: a ``data_collator`` for a ``transformers.Trainer``
    (:class:`distill.nlp.DistillTrainer`) when teacher and student tokenise differently.

    Keys: ``"<side>.input_ids"`` etc. (plain ``input_ids`` etc. for one tokenizer) and ``labels``.
    The Trainer drops columns its model's ``forward`` does not name before collating, raw text
    included: set ``TrainingArguments(remove_unused_columns=False)``.
    """

    def __init__(self, tokenizers: Any | Mapping[str, Any], max_length: int = 128,
                 text_key: str = "text", label_key: str = "label") -> None:
        self.sides = dict(tokenizers) if isinstance(tokenizers, Mapping) else {None: tokenizers}
        self.max_length = max_length
        self.text_key, self.label_key = text_key, label_key

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        missing = next((e for e in examples if self.text_key not in e), None)
        if missing is not None:
            raise DistillError(
                f"an example has no '{self.text_key}' (it has {', '.join(map(str, missing)) or 'no keys'}); "
                "with a transformers Trainer set TrainingArguments(remove_unused_columns=False) so the text "
                "reaches the collator"
            )
        texts = [e[self.text_key] for e in examples]
        everyone = torch.arange(len(texts))
        batch: dict[str, torch.Tensor] = {}
        for side, tok in self.sides.items():
            for key, value in _pad(encode_texts(tok, texts, self.max_length), everyone).items():
                batch[key if side is None else f"{side}.{key}"] = value
        if examples and self.label_key in examples[0]:
            batch["labels"] = torch.tensor([int(e[self.label_key]) for e in examples], dtype=torch.long)
        return batch
