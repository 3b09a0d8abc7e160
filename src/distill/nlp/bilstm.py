"""A BiLSTM sentence classifier, the student of Tang et al. 2019 ("Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks")."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class BiLSTMClassifier(nn.Module):
    """Word embeddings, one bidirectional LSTM layer, the two directions' final states
    concatenated, a ReLU hidden layer, then logits.

    ``forward(input_ids [B, T], attention_mask [B, T] | None)`` -> logits ``[B, num_classes]``; it
    takes the same keyword inputs as a Hugging Face model (others, such as ``token_type_ids``, are
    ignored), so :class:`distill.nlp.feed.TextFeed` feeds it. Padding is skipped (packed sequences).
    Tap points: ``embedding`` ``[B, T, E]``, ``features`` ``[B, 2H]`` (the concatenated states),
    ``hidden`` ``[B, F]`` (after the ReLU layer).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        embedding_dim: int = 300,
        hidden_size: int = 150,
        fc_size: int = 200,
        dropout: float = 0.1,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.features = nn.Identity()
        self.hidden = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_size, fc_size), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(fc_size, num_classes))
        self.feature_taps = ["features", "hidden"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        x = self.embedding(input_ids)
        if attention_mask is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
        else:
            lengths = attention_mask.sum(-1).clamp_min(1).cpu()
        if torch.onnx.is_in_onnx_export():  # ONNX has no packed sequences
            states = self._final_states_unpacked(x, lengths)
        else:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.lstm(packed)  # h: [2, B, H], the forward and backward final states
            states = torch.cat([h[0], h[1]], dim=-1)
        features = self.features(states)
        return self.classifier(self.hidden(features))

    def _final_states_unpacked(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, 2H]``: the final states of packed sequences, from padded ones. Forward: the output
        after each row's last real token (right padding comes later). Backward: the same LSTM on a
        copy with each row moved right, so the backward pass reads the real tokens first; its output
        at the first real token has seen exactly those."""
        batch, steps, width = x.shape
        hidden = self.lstm.hidden_size
        lengths = lengths.to(x.device).reshape(batch, 1)
        positions = torch.arange(steps, device=x.device).reshape(1, steps)
        out, _ = self.lstm(x)
        forward = out.gather(1, (lengths - 1).reshape(batch, 1, 1).expand(batch, 1, 2 * hidden))[:, 0, :hidden]
        shift = steps - lengths
        moved = x.gather(1, ((positions - shift) % steps).unsqueeze(-1).expand(batch, steps, width))
        out, _ = self.lstm(moved)
        backward = out.gather(1, shift.reshape(batch, 1, 1).expand(batch, 1, 2 * hidden))[:, 0, hidden:]
        return torch.cat([forward, backward], dim=-1)
