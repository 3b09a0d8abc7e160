"""A small GPT: a decoder-only causal language model in plain PyTorch.

The architecture of GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"): token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks of causal
self-attention and a 4× GELU MLP, a final LayerNorm and a linear head tied to the token embedding.
Attention is ``F.scaled_dot_product_attention(..., is_causal=True)``, which picks a fused kernel
where the hardware has one.

    model = create_model("gpt", num_classes=65, input_shape=(64,), n_layer=4, n_head=4, n_embd=128)
    logits = model(tokens)                  # [B, T] token ids -> [B, T, vocab_size]

``num_classes`` is the data's vocabulary; ``vocab_size`` (default: ``num_classes``) may pad the
embedding and head beyond it (GPT-2's 50,257 tokens padded to 50,304 for faster matrix products);
the token losses cut such padding off (``vocab_size`` in :mod:`distill.losses.token_divergences`).
``block_size`` (default: ``input_shape[0]``) is the longest context. Token ids may arrive as any
integer or float dtype (the batch loader hands sequences over as float32) and are cast to int64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.models.registry import MODELS


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions ≤ t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past: list | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        causal = True
        if past is not None:  # generation: [keys, values] of the tokens before x, extended in place
            if past:
                if t != 1:
                    raise ValueError("gpt: with a filled cache, feed one new token at a time")
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
                causal = False  # one query, the last position: it may see every cached key
            past[:] = [k, v]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, past: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), past)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``[B, T]`` (T ≤ ``block_size``) -> next-token logits ``[B, T, vocab_size]``.

    ``logits[:, t]`` is the distribution of token ``t + 1`` given tokens ``0..t``. ``feature_taps``
    lists each block's output (``blocks.0``, ...) and the final ``ln_f``, all ``[B, T, n_embd]``.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        # GPT-2: residual projections scaled by 1/sqrt(2 n_layer) so the residual stream's variance
        # does not grow with depth
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        self.feature_taps = [f"blocks.{i}" for i in range(n_layer)] + ["ln_f"]

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    supports_cache = True  # distill.tasks.causal_lm.generate may pass ``cache``

    def forward(self, idx: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """``idx`` ``[B, T]`` -> logits ``[B, T, V]``.

        ``cache`` (generation only): an empty list to hold each layer's keys and values after a
        first call on the prompt; later calls feed one new token ``[B, 1]`` and reuse them, so a
        step costs one position instead of the whole context.
        """
        if idx.dim() != 2:
            raise ValueError(f"gpt: expected token ids [B, T], got shape {tuple(idx.shape)}")
        start = cache[0][0].shape[2] if cache else 0
        t = idx.shape[1]
        if start + t > self.block_size:
            raise ValueError(f"gpt: sequence of {start + t} tokens exceeds block_size {self.block_size}")
        if cache is not None and not cache:
            cache.extend([] for _ in self.blocks)
        idx = idx.long()
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.head(self.ln_f(x))


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistillError(f"model 'gpt': {name} must be a positive integer, got {value!r}")
    return value


@MODELS.register("gpt")
def gpt(
    num_classes: int,
    input_shape: tuple[int, ...],
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int | None = None,
    vocab_size: int | None = None,
    dropout: float = 0.0,
    bias: bool = True,
    tie_weights: bool = True,
) -> nn.Module:
    """A GPT-2-style causal LM (see the module); ``input_shape`` is ``(T,)``, the sequence length."""
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        _positive(value, name)
    if n_embd % n_head:
        raise DistillError(f"model 'gpt': n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if len(input_shape) != 1:
        raise DistillError(f"model 'gpt' reads token sequences, input_shape (T,); got {tuple(input_shape)}")
    block_size = _positive(block_size if block_size is not None else int(input_shape[0]), "block_size")
    if block_size < int(input_shape[0]):
        raise DistillError(f"model 'gpt': block_size {block_size} is shorter than the sequences ({input_shape[0]})")
    vocab_size = _positive(vocab_size if vocab_size is not None else num_classes, "vocab_size")
    if vocab_size < num_classes:
        raise DistillError(
            f"model 'gpt': vocab_size {vocab_size} is smaller than the data's {num_classes} tokens; "
            "it may only pad the vocabulary"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise DistillError(f"model 'gpt': dropout must be in [0, 1), got {dropout!r}")
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, float(dropout), bool(bias), bool(tie_weights))
