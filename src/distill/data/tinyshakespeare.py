"""Tiny Shakespeare (Karpathy 2015, char-rnn): 1,115,394 characters of Shakespeare's plays.

The text is cut into fixed-length blocks for next-token prediction: sample ``i`` is
``input = ids[s : s + T]`` and ``target = ids[s + 1 : s + T + 1]`` with ``s = i · stride``, both int64
``[T]``, so ``target[t]`` is the token after ``input[t]`` and every position has a target. The first
``1 − val_fraction`` of the text gives the training blocks and the rest the held-out blocks
(``DataSplits.test``), as in char-rnn and nanoGPT; no block straddles the split.

Tokenizers:

- ``"char"`` (default): one token per character, the vocabulary being the text's sorted distinct
  characters (65 of them). ``extra["vocab"]`` holds them as one string: ``decode_chars`` maps ids back.
- ``"gpt2"``: GPT-2's byte-level BPE (50,257 tokens) from ``vocab.json`` and ``merges.txt`` in the
  folder ``tokenizer_path``; needs the ``tokenizers`` package (the ``nlp`` extra). Nothing is
  downloaded for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill.data.registry import register_builder
from distill.data.download import fetch_files, sha256_of
from distill.data.types import ArrayDataset, DataSplits
from distill.errors import DistillError

TINY_SHAKESPEARE_MIRRORS = ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"]
TINY_SHAKESPEARE_FILE = "input.txt"
# SHA-256 of char-rnn's data/tinyshakespeare/input.txt (1,115,394 bytes). Computed here from a local
# copy of that size, and equal to the digest that independent public projects (TensorFlow Datasets'
# checksum for the same URL among them) record for the file.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TOKENIZERS = ("char", "gpt2")


def char_vocab(text: str) -> str:
    """The sorted distinct characters of ``text``: token ``i`` is ``vocab[i]``."""
    return "".join(sorted(set(text)))


def encode_chars(text: str, vocab: str) -> torch.Tensor:
    """int64 ``[len(text)]`` ids of ``text``'s characters in ``vocab``; raises on an unknown one."""
    table = {c: i for i, c in enumerate(vocab)}
    try:
        return torch.tensor([table[c] for c in text], dtype=torch.int64)
    except KeyError as exc:
        raise DistillError(f"character {exc.args[0]!r} is not in the vocabulary") from None


def decode_chars(ids, vocab: str) -> str:
    """The text of token ids (any integer or float sequence or tensor) in the character ``vocab``."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return "".join(vocab[int(i)] for i in values)


def gpt2_tokenizer(tokenizer_path: str | Path):
    """GPT-2's byte-level BPE tokenizer (``tokenizers.ByteLevelBPETokenizer``) from a folder holding
    ``vocab.json`` and ``merges.txt``."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        raise DistillError(
            "tokenizer='gpt2' needs the `tokenizers` package: pip install 'distill[nlp]'"
        ) from None
    folder = Path(tokenizer_path).expanduser()
    files = [folder / "vocab.json", folder / "merges.txt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DistillError(f"tokenizer_path {folder} lacks {', '.join(missing)} (GPT-2's vocab.json and merges.txt)")
    return ByteLevelBPETokenizer(str(files[0]), str(files[1]))


def text_blocks(ids: torch.Tensor, block_size: int, stride: int) -> ArrayDataset:
    """Blocks of ``ids`` ``[n]``: inputs ``ids[s:s+T]``, targets ``ids[s+1:s+T+1]`` for s = 0, stride, ..."""
    if len(ids) < block_size + 1:
        raise DistillError(f"a text of {len(ids)} tokens is too short for blocks of {block_size}")
    inputs = ids[:-1].unfold(0, block_size, stride).contiguous()
    targets = ids[1:].unfold(0, block_size, stride).contiguous()
    return ArrayDataset(inputs, targets)


def _read_text(data_dir: Path, path: str | Path | None, download: bool, mirror: str | None) -> tuple[Path, str]:
    if path is not None:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / TINY_SHAKESPEARE_FILE
        if not file.is_file():
            raise DistillError(f"tinyshakespeare: {file} does not exist; give the path of char-rnn's input.txt")
    else:
        folder = data_dir / "tinyshakespeare"
        file = folder / TINY_SHAKESPEARE_FILE
        if not file.is_file() or sha256_of(file) != TINY_SHAKESPEARE_SHA256:
            if not download:
                raise DistillError(f"tinyshakespeare: {file} is missing or differs from the official file; pass download=True")
            file.unlink(missing_ok=True)
            mirrors = ([mirror] if mirror else []) + TINY_SHAKESPEARE_MIRRORS
            file = fetch_files(mirrors, {TINY_SHAKESPEARE_FILE: TINY_SHAKESPEARE_SHA256}, folder)[TINY_SHAKESPEARE_FILE]
    if sha256_of(file) != TINY_SHAKESPEARE_SHA256:
        raise DistillError(
            f"tinyshakespeare: {file} differs from char-rnn's input.txt (its SHA-256 should be "
            f"{TINY_SHAKESPEARE_SHA256}); use the official file"
        )
    return file, file.read_text(encoding="utf-8")


@register_builder("tinyshakespeare")
def tinyshakespeare(
    data_dir: Path,
    *,
    path: str | Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    tokenizer: str = "char",
    tokenizer_path: str | Path | None = None,
    block_size: int = 64,
    stride: int | None = None,
    val_fraction: float = 0.1,
) -> DataSplits:
    """Tiny Shakespeare as next-token blocks (see the module): inputs and targets int64 ``[N, T]``.

    The file lives in ``data_dir/tinyshakespeare/`` and is downloaded there from char-rnn's
    repository (or ``mirror``, a base URL tried first) and checked by SHA-256; ``path`` reads a
    local copy (the file or its folder) instead, checked the same way. ``stride`` (default:
    ``block_size``, no overlap) spaces the blocks. ``num_classes`` is the vocabulary size and
    ``input_shape`` is ``(block_size,)``.
    """
    if tokenizer not in TOKENIZERS:
        raise DistillError(f"tinyshakespeare: unknown tokenizer {tokenizer!r}; choose {' or '.join(TOKENIZERS)}")
    for name, value in (("block_size", block_size), ("stride", block_size if stride is None else stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistillError(f"tinyshakespeare: {name} must be a positive integer, got {value!r}")
    stride = block_size if stride is None else stride
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DistillError(f"tinyshakespeare: val_fraction must be between 0 and 1, got {val_fraction!r}")
    if tokenizer == "gpt2" and tokenizer_path is None:
        raise DistillError(
            "tinyshakespeare: tokenizer='gpt2' needs tokenizer_path, a folder with GPT-2's vocab.json and merges.txt"
        )
    file, text = _read_text(data_dir, path, download, mirror)
    extra: dict = {"source": str(file), "tokenizer": tokenizer}
    if tokenizer == "char":
        vocab = char_vocab(text)
        ids = encode_chars(text, vocab)
        classes = len(vocab)
        extra["vocab"] = vocab
    else:
        bpe = gpt2_tokenizer(tokenizer_path)
        ids = torch.from_numpy(np.asarray(bpe.encode(text).ids, dtype=np.int64))
        classes = bpe.get_vocab_size()
        extra["tokenizer_path"] = str(tokenizer_path)
    cut = int(len(ids) * (1 - val_fraction))
    train = text_blocks(ids[:cut], block_size, stride)
    val = text_blocks(ids[cut:], block_size, stride)
    return DataSplits(
        name="tinyshakespeare",
        train=train,
        test=val,
        num_classes=classes,
        input_shape=(block_size,),
        extra=extra,
    )
