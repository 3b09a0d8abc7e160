"""Recommendation rankers: score (user, item) pairs for implicit feedback.

    model = create_ranker("mf", num_users=943, num_items=1682, dim=16)
    scores = model(users, items)        # users [B], items [B, L] -> [B, L]
    scores = model(users)               # every item: [B, num_items]

A ranker's ``forward(users, items=None)`` takes int64 user ids ``[B]`` and item ids ``[B, L]`` (a
candidate list per user), ``[B]`` (one item each; gives ``[B]``) or ``None`` (every item; gives
``[B, num_items]``). Scores are logits: higher ranks first, ``sigmoid(score)`` is the predicted
probability of an interaction.

These models do not fit the classification zoo's contract (``[B, *input_shape]`` in, ``[B,
num_classes]`` out, built from ``num_classes`` and ``input_shape``): they need the number of
users, and training feeds them candidate lists. They have their own small registry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from distill.errors import DistillError
from distill.registry import Registry

RANKERS: Registry[Callable[..., nn.Module]] = Registry("ranking model")


def _check_ids(users: torch.Tensor, items: torch.Tensor | None) -> None:
    if users.dim() != 1:
        raise ValueError(f"users must be int64 [B], got shape {tuple(users.shape)}")
    if items is not None and (items.dim() not in (1, 2) or items.shape[0] != users.shape[0]):
        raise ValueError(
            f"items must be [B] or [B, L] with B = {users.shape[0]} users, got shape {tuple(items.shape)}"
        )


class Ranker(nn.Module):
    """Base class: sizes, and the ``items`` shape handling every ranker shares."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DistillError(f"{name} must be a positive integer, got {value!r}")
        self.num_users = num_users
        self.num_items = num_items

    def forward(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        _check_ids(users, items)
        if items is not None and items.dim() == 1:
            return self.score(users, items[:, None])[:, 0]
        return self.score(users, items)

    def score(self, users: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        """``[B, L]`` scores for ``items`` ``[B, L]``, or ``[B, num_items]`` when ``items`` is None."""
        raise NotImplementedError


class MatrixFactorization(Ranker):
    """Matrix factorisation: ``score(u, i) = <p_u, q_i> + b_u + b_i``.

    Embeddings start at N(0, 0.01²) (as in He et al. 2017), biases at zero. The user bias does not
    change a user's ranking; it lets pointwise losses calibrate ``sigmoid(score)``.
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 16, init_std: float = 0.01) -> None:
        super().__init__(num_users, num_items)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DistillError(f"model 'mf': dim must be a positive integer, got {dim!r}")
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        p, b_u = self.user(users), self.user_bias(users)  # [B, d], [B, 1]
        if items is None:
            return p @ self.item.weight.T + self.item_bias.weight.T + b_u
        q = self.item(items)  # [B, L, d]
        return torch.einsum("bd,bld->bl", p, q) + self.item_bias(items)[..., 0] + b_u


class NeuMF(Ranker):
    """Neural matrix factorisation (He et al. 2017, "Neural Collaborative Filtering").

    Two towers on separate embeddings, fused by one linear layer:
    ``score = w_g · (p_u ⊙ q_i) + w_m · MLP([m_u; m_i])``. The GMF embeddings have ``dim``
    entries; the MLP embeddings ``layers[0] / 2`` each, and the MLP has ReLU layers of widths
    ``layers[1:]`` after its input layer of width ``layers[0]`` (the paper's tower halves each
    layer: ``(256, 128, 64)`` for 64 predictive factors). The first MLP layer is applied to the user
    and item halves separately (the same map as one linear layer on the concatenation), so scoring
    every item needs the item half once, not once per user.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int = 64,
        layers: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(num_users, num_items)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DistillError(f"model 'neumf': dim must be a positive integer, got {dim!r}")
        layers = list(layers)
        if len(layers) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in layers):
            raise DistillError(f"model 'neumf': layers must be at least two positive widths, got {layers}")
        if layers[0] % 2:
            raise DistillError(f"model 'neumf': layers[0] is split between user and item, so must be even, got {layers[0]}")
        half = layers[0] // 2
        self.gmf_user = nn.Embedding(num_users, dim)
        self.gmf_item = nn.Embedding(num_items, dim)
        self.mlp_user = nn.Embedding(num_users, half)
        self.mlp_item = nn.Embedding(num_items, half)
        for emb in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(emb.weight, std=init_std)
        self.input_user = nn.Linear(half, layers[1])
        self.input_item = nn.Linear(half, layers[1], bias=False)
        tower: list[nn.Module] = [nn.ReLU()]
        for width_in, width_out in zip(layers[1:-1], layers[2:]):
            if dropout > 0:
                tower.append(nn.Dropout(dropout))
            tower += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.tower = nn.Sequential(*tower)
        self.predict_gmf = nn.Linear(dim, 1, bias=False)
        self.predict_mlp = nn.Linear(layers[-1], 1)

    def score(self, users: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        # GMF half: w_g · (p ⊙ q) = (p ⊙ w_g) · q, a matrix product
        p = self.gmf_user(users) * self.predict_gmf.weight[0]  # [B, d]
        user_part = self.input_user(self.mlp_user(users))[:, None, :]  # [B, 1, h]
        if items is None:
            gmf = p @ self.gmf_item.weight.T  # [B, I]
            item_part = self.input_item(self.mlp_item.weight)[None]  # [1, I, h]
        else:
            gmf = torch.einsum("bd,bld->bl", p, self.gmf_item(items))
            item_part = self.input_item(self.mlp_item(items))  # [B, L, h]
        mlp = self.predict_mlp(self.tower(user_part + item_part))[..., 0]
        return gmf + mlp


@RANKERS.register("mf")
def mf(num_users: int, num_items: int, dim: int = 16, init_std: float = 0.01) -> nn.Module:
    """Matrix factorisation with biases; ``dim`` embedding entries per user and item."""
    return MatrixFactorization(num_users, num_items, dim, init_std)


@RANKERS.register("neumf")
def neumf(
    num_users: int, num_items: int, dim: int = 64, layers: Sequence[int] = (256, 128, 64),
    dropout: float = 0.0, init_std: float = 0.01,
) -> nn.Module:
    """NeuMF (He et al. 2017): GMF with ``dim`` factors beside an MLP tower of ``layers``."""
    return NeuMF(num_users, num_items, dim, layers, dropout, init_std)


def create_ranker(name: str, num_users: int, num_items: int, **kwargs) -> nn.Module:
    """Build the ranker registered as ``name`` (``mf``, ``neumf``) for these sizes.

    ``name`` may also be ``package.module:callable`` for your own ranker; it is called as
    ``callable(num_users, num_items, **kwargs)`` and must follow the ``forward(users, items=None)``
    contract above.
    """
    if ":" in name:
        from distill.models import _import_callable

        factory = _import_callable(name)
    else:
        factory = RANKERS.get(name)
    try:
        model = factory(num_users, num_items, **kwargs)
    except TypeError as exc:
        raise DistillError(f"ranking model '{name}': {exc}") from None
    if not isinstance(model, nn.Module):
        raise DistillError(f"ranking model '{name}' returned a {type(model).__name__}, not an nn.Module")
    return model


def ranker_names() -> list[str]:
    return RANKERS.names()
