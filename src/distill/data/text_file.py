"""``text``: a UTF-8 text file of your own as next-character blocks (``task: causal-lm``)."""

from __future__ import annotations

from pathlib import Path

from distill.data.registry import register_builder
from distill.data.tinyshakespeare import char_vocab, encode_chars, text_blocks
from distill.data.types import DataSplits
from distill.errors import DistillError


@register_builder("text")
def text_file(
    data_dir,
    *,
    path: str | Path,
    block_size: int = 64,
    stride: int | None = None,
    val_fraction: float = 0.1,
) -> DataSplits:
    """A UTF-8 text file of your own as next-character blocks, as ``tinyshakespeare`` cuts its text
    (character vocabulary, the first ``1 − val_fraction`` for training, the rest held out)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistillError(f"data set 'text': {file} does not exist")
    for name, value in (("block_size", block_size), ("stride", block_size if stride is None else stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistillError(f"data set 'text': {name} must be a positive integer, got {value!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DistillError(f"data set 'text': val_fraction must be between 0 and 1, got {val_fraction!r}")
    text = file.read_text(encoding="utf-8")
    vocab = char_vocab(text)
    ids = encode_chars(text, vocab)
    cut = int(len(ids) * (1 - val_fraction))
    stride = block_size if stride is None else stride
    return DataSplits(name="text", train=text_blocks(ids[:cut], block_size, stride),
                      test=text_blocks(ids[cut:], block_size, stride), num_classes=len(vocab),
                      input_shape=(block_size,), extra={"source": str(file), "tokenizer": "char", "vocab": vocab})
