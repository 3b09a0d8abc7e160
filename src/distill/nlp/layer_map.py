"""Layer maps: which teacher layer each student layer learns from (TinyBERT, Jiao et al. 2020,
"TinyBERT: Distilling BERT for Natural Language Understanding").

    terms = layer_map_terms(student_layers=2, teacher_layers=6)   # + a kd term on the logits

gives, for student layer ``m`` (1..M) and teacher layer ``g(m)``:

- ``hidden<m>``: ``hint`` (MSE) from ``hidden_states.<m>`` through a learned linear projection
  (the adapter; TinyBERT's ``W_h``, here one per layer) to the teacher's ``hidden_states.<g(m)>``;
- ``attention<m>``: ``hint`` with an identity adapter, the MSE between the two layers' attention
  probabilities ``attentions.<m-1>`` and ``attentions.<g(m)-1>`` (TinyBERT matches the scores
  before softmax; HF models return probabilities). Student and teacher need the same number of
  heads and the same tokenizer (equal sequence lengths);
- ``hidden0``: the embedding outputs (``hidden_states.0``), TinyBERT's embedding-layer loss.
"""

from __future__ import annotations

from distill.errors import DistillError
from distill.objective import Term


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """TinyBERT's uniform map ``g(m) = m * N / M`` (rounded down), ``g(0) = 0`` (embeddings):
    ``{0: 0, 1: 3, 2: 6}`` for 2 student and 6 teacher layers."""
    if not 1 <= student_layers <= teacher_layers:
        raise DistillError(
            f"a layer map needs 1 <= student layers <= teacher layers, got {student_layers} and {teacher_layers}"
        )
    return {m: m * teacher_layers // student_layers for m in range(student_layers + 1)}


def layer_map_terms(
    student_layers: int,
    teacher_layers: int,
    *,
    layer_map: dict[int, int] | None = None,
    hidden_weight: float = 1.0,
    attention_weight: float = 1.0,
    embeddings: bool = True,
) -> list[Term]:
    """Hint terms on hidden states and attentions through ``layer_map`` (default
    :func:`uniform_layer_map`), for models wrapped in :class:`distill.nlp.hf.HFModel`. A weight of 0
    leaves that kind of term out."""
    mapping = dict(layer_map) if layer_map is not None else uniform_layer_map(student_layers, teacher_layers)
    terms = []
    for m, n in sorted(mapping.items()):
        if not (0 <= m <= student_layers and 0 <= n <= teacher_layers) or (m == 0) != (n == 0):
            raise DistillError(
                f"layer map entry {m} -> {n}: student layers are 0..{student_layers}, teacher layers "
                f"0..{teacher_layers}, and 0 (the embeddings) maps to 0 only"
            )
        if m == 0 and not embeddings:
            continue
        if hidden_weight:
            terms.append(Term(f"hidden{m}", "hint", weight=hidden_weight,
                              student=f"hidden_states.{m}", teacher=f"hidden_states.{n}"))
        if m > 0 and attention_weight:
            terms.append(Term(f"attention{m}", "hint", weight=attention_weight, adapter="identity",
                              student=f"attentions.{m - 1}", teacher=f"attentions.{n - 1}"))
    return terms
