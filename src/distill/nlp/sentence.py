"""Sentence embeddings: pooling, a Hugging Face encoder that gives ``[B, D]`` embeddings, and a static
embedding-table student.

    teacher, tok = load_sentence_encoder("path/to/all-MiniLM-L6-v2")     # SentenceEncoder, tokenizer
    student = truncated_encoder(teacher, layers=[0, 5])                   # 2 of its 6 layers
    static = StaticEmbedding.from_encoder(teacher, tok)                   # one vector per token
    static.save_model2vec("out/static", tok)                              # model2vec.StaticModel loads it
    vectors = embed(student, tok, ["A man plays a guitar.", ...])         # float32 [N, D], unit length

Both models take a Hugging Face model's keyword inputs (``input_ids`` ``[B, T]``,
``attention_mask`` ``[B, T]``; others are ignored) and return float ``[B, D]`` embeddings (unit
length unless ``normalize=False``), so :class:`distill.nlp.feed.TextFeed` feeds them and the
embedding losses (``embedding_cosine``, ``hint``) read the output as the ``logits`` tap. Tap points:
``pooled`` (the mean-pooled embedding before normalisation) and, for :class:`SentenceEncoder`, the
per-layer ``hidden_states.<i>`` of :class:`distill.nlp.hf.HFModel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.nlp.hf import HFModel, load_pretrained


def mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``tokens`` ``[B, T, D]`` over the positions where ``attention_mask`` ``[B, T]`` is
    non-zero (all positions when it is ``None``): ``[B, D]``. A row with no position is zeros."""
    if attention_mask is None:
        return tokens.mean(1)
    mask = attention_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class SentenceEncoder(HFModel):
    """A Hugging Face encoder (no head) whose output is the mean of its last hidden states over the
    real tokens, normalised to unit length (sentence-transformers' mean pooling + ``Normalize``).

    ``forward(input_ids [B, T], attention_mask [B, T] | None, ...)`` -> float ``[B, D]``. Taps:
    ``hidden_states.<i>`` (``[B, T, D]``, ``0`` the embeddings), ``attentions.<i>``, ``pooled``
    (``[B, D]``, before normalisation).
    """

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        if getattr(model, "pooler", None) is not None:  # BERT's [CLS] pooler: unused by mean pooling
            model.pooler = None
        super().__init__(model)
        self.normalize = normalize
        self.pooled = nn.Identity()

    def forward(self, input_ids: Any = None, attention_mask: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        if attention_mask is None and input_ids is not None:
            attention_mask = torch.ones_like(torch.as_tensor(input_ids))
        out = super().forward(input_ids, attention_mask=attention_mask, **inputs)
        pooled = self.pooled(mean_pool(out.last_hidden_state, attention_mask))
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def load_sentence_encoder(
    name_or_path: str | os.PathLike[str], *, normalize: bool = True, tokenizer: str | None = None, **kwargs: Any
) -> tuple[SentenceEncoder, Any]:
    """A pretrained encoder (a local folder or hub name, e.g. all-MiniLM-L6-v2) as a
    :class:`SentenceEncoder`, and its tokenizer. Keyword arguments go to ``from_pretrained``."""
    wrapped, tok = load_pretrained(name_or_path, task="base", tokenizer=tokenizer, **kwargs)
    return SentenceEncoder(wrapped.model, normalize=normalize), tok


def keep_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """``model`` (a bare ``transformers`` encoder such as ``BertModel``) with only its transformer
    layers ``layers`` (0-based, in order; e.g. ``[0, 5]``), in place: the usual way to initialise a
    shallower student from its teacher (DistilBERT, Sanh et al. 2019, keeps every other layer)."""
    encoder = getattr(model, "encoder", None)
    stack = getattr(encoder, "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise DistillError(f"{type(model).__name__} has no encoder.layer list; keep_layers knows BERT-style encoders")
    picked = [int(i) for i in layers]
    if not picked or sorted(set(picked)) != picked or picked[0] < 0 or picked[-1] >= len(stack):
        raise DistillError(f"layers must be increasing indices in 0..{len(stack) - 1}, got {list(layers)}")
    encoder.layer = nn.ModuleList(stack[i] for i in picked)
    model.config.num_hidden_layers = len(picked)
    for i, layer in enumerate(encoder.layer):  # layer_idx names the KV cache slot in newer transformers
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i
    return model


def truncated_encoder(encoder: SentenceEncoder, layers: Sequence[int]) -> SentenceEncoder:
    """A copy of ``encoder`` with only transformer ``layers`` (see :func:`keep_layers`)."""
    import copy

    model = copy.deepcopy(encoder.model)
    return SentenceEncoder(keep_layers(model, layers), normalize=encoder.normalize)


class StaticEmbedding(nn.Module):
    """A static sentence embedding: one trained vector per token, averaged over the sentence's
    tokens (like Model2Vec, Tulkens & van Dongen 2024, but trained by distillation rather than only
    read off the teacher).

    ``forward(input_ids [B, T], attention_mask [B, T] | None)`` -> float ``[B, D]`` (unit length
    unless ``normalize=False``); positions with mask 0, the ``padding_idx`` token and the
    ``skip_ids`` tokens are left out of the mean. :meth:`from_vectors` skips the tokenizer's special
    tokens (``[CLS]``, ``[SEP]``, ``[UNK]``, ...), as Model2Vec does, so that the model saved by
    :meth:`save_model2vec` gives the same embeddings under ``model2vec.StaticModel``. Tap point:
    ``pooled`` ``[B, D]`` (the mean, before normalisation). Initialise it from a teacher with
    :meth:`from_encoder`.
    """

    def __init__(self, vocab_size: int, dim: int = 256, padding_idx: int = 0, normalize: bool = True,
                 skip_ids: Sequence[int] = ()) -> None:
        super().__init__()
        if vocab_size < 1 or dim < 1 or not 0 <= padding_idx < vocab_size:
            raise DistillError(f"StaticEmbedding needs vocab_size, dim >= 1 and padding_idx in the vocabulary, "
                               f"got {vocab_size}, {dim}, {padding_idx}")
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=padding_idx)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[padding_idx].zero_()
        self.padding_idx = padding_idx
        self.normalize = normalize
        skipped = sorted({int(i) for i in skip_ids if 0 <= int(i) < vocab_size} - {padding_idx})
        # not persistent: weights files hold the table alone, as before skip_ids existed
        self.register_buffer("skip_ids", torch.tensor(skipped, dtype=torch.long), persistent=False)
        self.pooled = nn.Identity()

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        ids = torch.as_tensor(input_ids).long()
        if attention_mask is not None:
            ids = ids.masked_fill(attention_mask == 0, self.padding_idx)
        if self.skip_ids.numel():  # a comparison with each special id (torch.isin has no ONNX export)
            ids = ids.masked_fill((ids.unsqueeze(-1) == self.skip_ids).sum(-1) > 0, self.padding_idx)
        if torch.onnx.is_in_onnx_export():  # EmbeddingBag with padding_idx has no ONNX form: the same mean
            keep = (ids != self.padding_idx).unsqueeze(-1).to(self.embedding.weight.dtype)
            total = (F.embedding(ids, self.embedding.weight) * keep).sum(1)
            mean = total / keep.sum(1).clamp_min(1.0)
        else:
            mean = self.embedding(ids)
        pooled = self.pooled(mean)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @classmethod
    def from_encoder(
        cls, encoder: nn.Module, tokenizer: Any, *, batch_size: int = 1024, normalize: bool = True,
        dim: int | None = None,
    ) -> "StaticEmbedding":
        """A table whose row ``t`` is ``encoder``'s mean-pooled, un-normalised output for the
        one-token sentence ``[CLS] t [SEP]`` (Model2Vec's starting point; see :func:`token_vectors`
        and :meth:`from_vectors`). ``encoder`` is a :class:`SentenceEncoder`."""
        vectors = token_vectors(encoder, tokenizer, batch_size=batch_size)
        return cls.from_vectors(vectors, tokenizer, normalize=normalize, dim=dim)

    @classmethod
    @torch.no_grad()
    def from_vectors(
        cls, vectors: torch.Tensor, tokenizer: Any, *, normalize: bool = True, dim: int | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> "StaticEmbedding":
        """A table initialised from ``vectors`` ``[V, D]`` (one per token of ``tokenizer``); special
        tokens start at zero and are left out of the mean (``skip_ids``). ``dim`` smaller than
        ``D`` keeps the leading principal components (PCA over the vocabulary, as Model2Vec).
        ``token_weights`` ``[V]`` scales each row (e.g. :func:`sif_weights`: frequent tokens count
        less in the mean)."""
        if dim is not None and dim < vectors.shape[1]:
            centred = (vectors - vectors.mean(0)).double()
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            vectors = (centred @ v[:dim].T).float()
        if token_weights is not None:
            vectors = vectors * token_weights.reshape(-1, 1).to(vectors.dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        specials = [int(i) for i in getattr(tokenizer, "all_special_ids", [])]
        model = cls(vectors.shape[0], vectors.shape[1], padding_idx=int(pad), normalize=normalize, skip_ids=specials)
        model.embedding.weight.copy_(vectors)
        for special in specials:
            if 0 <= special < vectors.shape[0]:
                model.embedding.weight[special].zero_()
        return model

    def save_model2vec(self, folder: str | os.PathLike[str], tokenizer: Any, *, max_length: int | None = 512,
                       base_model: str | None = None) -> Path:
        """Write the table in Model2Vec's format, so that ``model2vec.StaticModel.from_pretrained(folder)``
        gives the embeddings this model gives (``encode(sentences)``, float32 ``[N, D]``):
        ``model.safetensors`` (``embeddings``: float32 ``[V, D]``), ``tokenizer.json`` (``tokenizer``'s
        ``tokenizers`` backend), ``config.json`` (``normalize``, ``max_length``, ``hidden_dim``, ...),
        ``modules.json`` (sentence-transformers' layout) and a short ``README.md``.

        ``tokenizer`` is the ``transformers`` fast tokenizer the model was trained with (``len``
        ``V``). Model2Vec adds no special tokens and drops unknown ones: the embeddings agree when
        this model skips them (``skip_ids``; :meth:`from_vectors` sets them). ``max_length``:
        tokens kept per sentence by Model2Vec (``None``: all). ``base_model``: where the tokenizer
        (the teacher) came from, recorded as ``tokenizer_name``. Built aside and moved into place
        (:func:`distill.checkpoints.atomic_directory`); returns the folder."""
        import json

        from safetensors.torch import save_file

        from distill.checkpoints import atomic_directory

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DistillError(f"{type(tokenizer).__name__} has no tokenizers backend; Model2Vec needs a fast "
                               "tokenizer (transformers' PreTrainedTokenizerFast)")
        vocab = backend.get_vocab_size(with_added_tokens=True)
        if vocab != self.vocab_size:
            raise DistillError(f"the tokenizer has {vocab} tokens but the table {self.vocab_size} rows; Model2Vec "
                               "needs one row per token: pass the tokenizer the model was built with")
        specials = [int(i) for i in getattr(tokenizer, "all_special_ids", [])]
        unskipped = sorted(set(specials) - set(self.skip_ids.tolist()) - {self.padding_idx})
        if unskipped:
            raise DistillError(
                f"this model averages the special tokens {unskipped} into its embeddings, which Model2Vec leaves "
                "out, so the saved model would embed differently; build it with skip_ids=tokenizer.all_special_ids"
            )
        weights = self.embedding.weight.detach().float().cpu().contiguous()
        config = {"model_type": "model2vec", "architectures": ["StaticModel"], "tokenizer_name": base_model,
                  "apply_pca": None, "sif_coefficient": None, "hidden_dim": int(weights.shape[1]),
                  "seq_length": 1000000, "normalize": bool(self.normalize), "pooling": "mean",
                  "max_length": max_length, "embedding_dtype": "float32"}
        modules = [{"idx": 0, "name": "0", "path": ".", "type": "sentence_transformers.models.StaticEmbedding"}]
        if self.normalize:
            modules.append({"idx": 1, "name": "1", "path": "1_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        readme = ("---\nlibrary_name: model2vec\ntags:\n- embeddings\n- static-embeddings\n- distill\n---\n\n"
                  f"# A static sentence embedding\n\nOne vector per token ({weights.shape[0]} tokens x "
                  f"{weights.shape[1]} dimensions), distilled with distill"
                  + (f" from {base_model}" if base_model else "") + ", in Model2Vec's format:\n\n"
                  "```python\nfrom model2vec import StaticModel\n\nmodel = StaticModel.from_pretrained(FOLDER)\n"
                  "vectors = model.encode([\"It's dangerous to go alone!\"])\n```\n")

        def write(tmp: Path) -> None:
            save_file({"embeddings": weights}, str(tmp / "model.safetensors"))
            backend.save(str(tmp / "tokenizer.json"), pretty=False)
            (tmp / "config.json").write_text(json.dumps(config, indent=4))
            (tmp / "modules.json").write_text(json.dumps(modules, indent=4))
            (tmp / "README.md").write_text(readme)

        return atomic_directory(Path(os.path.expanduser(os.fspath(folder))), write)


def sif_weights(counts: torch.Tensor, coefficient: float = 1e-3) -> torch.Tensor:
    """float32 ``[V]``: ``a / (a + p(t))`` for each token's frequency ``p(t) = counts[t] / sum``
    (smooth inverse frequency, Arora et al. 2017, "A Simple but Tough-to-Beat Baseline for Sentence
    Embeddings"; Model2Vec weights its table the same way). Unseen tokens weigh 1."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    total = float(counts.sum())
    if total <= 0 or coefficient <= 0:
        raise DistillError(f"sif_weights needs some counted token and a coefficient > 0, got {total}, {coefficient}")
    return (coefficient / (coefficient + counts / total)).float()


@torch.no_grad()
def token_vectors(encoder: nn.Module, tokenizer: Any, *, batch_size: int = 1024) -> torch.Tensor:
    """float32 ``[V, D]``: the encoder's mean-pooled output (before normalisation) for each token
    ``t`` of the tokenizer's vocabulary alone, as ``[CLS] t [SEP]`` when the tokenizer has those."""
    vocab = len(tokenizer)
    pooled_point = getattr(encoder, "pooled", None)
    if not isinstance(pooled_point, nn.Module):
        raise DistillError(f"{type(encoder).__name__} has no 'pooled' tap point; use a SentenceEncoder")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    was_training = encoder.training
    encoder.eval()
    captured: list[torch.Tensor] = []
    handle = pooled_point.register_forward_hook(lambda _m, _i, out: captured.append(out.float()))
    try:
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab))[:, None]
            parts = ([torch.full_like(ids, cls_id)] if cls_id is not None else []) + [ids] + (
                [torch.full_like(ids, sep_id)] if sep_id is not None else [])
            tokens = torch.cat(parts, 1)
            encoder(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    finally:
        handle.remove()
        encoder.train(was_training)
    return torch.cat(captured)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
) -> torch.Tensor:
    """float32 ``[N, D]``: ``model``'s embeddings of ``texts``, tokenised in batches of ``batch_size``
    (in the given order, each batch padded to its longest text), in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out.append(model(**inputs).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
