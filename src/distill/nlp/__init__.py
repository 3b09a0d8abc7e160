"""Text models and Hugging Face integration (the ``nlp`` extra: ``pip install distill[nlp]``).

    from distill.nlp import load_pretrained, from_config, TextLoader, TextFeed, load_sst2

- :mod:`distill.nlp.hf`: load a Hugging Face model as teacher or student (``load_pretrained``,
  ``from_config``), wrapped in :class:`HFModel` so ``hidden_states.<i>`` and ``attentions.<i>`` are
  taps, and save the student back as a Hugging Face folder (``save_pretrained``);
- :mod:`distill.nlp.feed`: :class:`TextFeed`, one per side, so teacher and student each read their
  own tokenisation from a batch;
- :mod:`distill.nlp.data`: :class:`TextDataset`, ``load_sst2``, :class:`TextLoader` (tokenises for
  every model), :class:`TextCollator` (the same for a ``transformers.Trainer``), ``word_tokenizer``;
- :mod:`distill.nlp.layer_map`: TinyBERT's layer map as hint terms;
- :mod:`distill.nlp.bilstm`: the BiLSTM student of Tang et al. 2019;
- :mod:`distill.nlp.sentence`: sentence embeddings: ``mean_pool``, :class:`SentenceEncoder` (an HF
  encoder giving ``[B, D]`` unit vectors), :class:`StaticEmbedding` (a trained token table, saved
  for Model2Vec by ``save_model2vec``), ``embed``;
- :mod:`distill.nlp.stsb`: STS-B sentence pairs (``read_stsb``) and rank correlation (``spearman``);
- ``DistillTrainer`` (:mod:`distill.nlp.hf_trainer`): a ``transformers.Trainer`` with a distill loss.

Importing this package does not import ``transformers``; the functions that need it do, and raise
a :class:`DistillError` naming ``pip install distill[nlp]`` when it is missing.
"""

from distill.nlp.bilstm import BiLSTMClassifier
from distill.nlp.data import TextCollator, TextDataset, TextLoader, TextSplits, load_sst2, word_tokenizer
from distill.nlp.feed import TextFeed, predict
from distill.nlp.hf import HFModel, from_config, load_pretrained, require_transformers, save_pretrained
from distill.nlp.layer_map import layer_map_terms, uniform_layer_map
from distill.nlp.sentence import (
    SentenceEncoder, StaticEmbedding, embed, keep_layers, load_sentence_encoder, mean_pool, truncated_encoder,
)
from distill.nlp.stsb import SentencePairs, read_stsb, spearman

__all__ = [
    "BiLSTMClassifier", "DistillTrainer", "HFModel", "TextCollator", "TextDataset", "TextFeed", "TextLoader",
    "TextSplits",
    "from_config", "layer_map_terms", "load_pretrained", "load_sst2", "predict", "require_transformers",
    "save_pretrained",
    "uniform_layer_map", "word_tokenizer",
    "SentenceEncoder", "SentencePairs", "StaticEmbedding", "embed", "keep_layers", "load_sentence_encoder",
    "mean_pool", "read_stsb", "spearman", "truncated_encoder",
]


def __getattr__(name: str):
    if name == "DistillTrainer":  # subclasses transformers.Trainer: import it only when asked for
        require_transformers()
        from distill.nlp.hf_trainer import DistillTrainer

        return DistillTrainer
    raise AttributeError(f"module 'distill.nlp' has no attribute {name!r}")
