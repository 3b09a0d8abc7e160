"""Implicit feedback: who interacted with what, split leave-one-out by time.

A recommendation data set is a list of ``(user, item, timestamp)`` events. With implicit feedback
every event is a positive (a rating of 1 counts as much as a 5). The leave-one-out split holds out
each user's *last* interaction as the test item and, when asked, the second-to-last as the
validation item; everything earlier is training history. This is the protocol of He et al. 2017
("Neural Collaborative Filtering") and most work that compares against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.errors import DistillError


@dataclass
class Interactions:
    """Implicit-feedback interactions after a leave-one-out split.

    Users and items are re-indexed to ``0..num_users-1`` and ``0..num_items-1`` in the order of
    their raw ids (``user_ids[u]`` / ``item_ids[i]`` give the raw id back).

    ``train_users``, ``train_items``: int64 ``[N]``, the training history, sorted by user and then
    by time. ``test_items``: int64 ``[num_users]``, each user's held-out last item, ``-1`` for a
    user with too few interactions to hold one out (such a user keeps all of them for training and
    is left out of evaluation). ``valid_items``: the same for the second-to-last item, or ``None``
    when no validation split was asked for.
    """

    num_users: int
    num_items: int
    train_users: torch.Tensor
    train_items: torch.Tensor
    test_items: torch.Tensor
    valid_items: torch.Tensor | None = None
    user_ids: torch.Tensor | None = None
    item_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.train_users) != len(self.train_items):
            raise ValueError("train_users and train_items differ in length")
        if len(self.test_items) != self.num_users:
            raise ValueError(f"test_items has {len(self.test_items)} entries for {self.num_users} users")
        if self.valid_items is not None and len(self.valid_items) != self.num_users:
            raise ValueError(f"valid_items has {len(self.valid_items)} entries for {self.num_users} users")

    @property
    def num_train(self) -> int:
        return len(self.train_items)

    def history(self) -> torch.Tensor:
        """bool ``[num_users, num_items]``: True where the user interacted with the item in training."""
        seen = torch.zeros(self.num_users, self.num_items, dtype=torch.bool)
        seen[self.train_users, self.train_items] = True
        return seen

    def known(self) -> torch.Tensor:
        """bool ``[num_users, num_items]``: every item the user is known to like (training,
        validation and test items): what a sampled negative must not be."""
        seen = self.history()
        for held in (self.valid_items, self.test_items):
            if held is not None:
                users = torch.nonzero(held >= 0).flatten()
                seen[users, held[users]] = True
        return seen

    def eval_users(self, split: str = "test") -> torch.Tensor:
        """int64 ``[U']``: the users that have a held-out item in ``split`` (``test`` or ``valid``)."""
        return torch.nonzero(self.held_out(split) >= 0).flatten()

    def held_out(self, split: str = "test") -> torch.Tensor:
        """int64 ``[num_users]``: the held-out item of each user in ``split``, ``-1`` for none."""
        if split == "test":
            return self.test_items
        if split in ("valid", "val", "validation"):
            if self.valid_items is None:
                raise DistillError("this split has no validation items; load the data with validation=True")
            return self.valid_items
        raise DistillError(f"unknown split '{split}'; use 'test' or 'valid'")


def leave_one_out(
    users: np.ndarray | torch.Tensor,
    items: np.ndarray | torch.Tensor,
    timestamps: np.ndarray | torch.Tensor,
    validation: bool = False,
) -> Interactions:
    """Split events ``(users[n], items[n], timestamps[n])`` leave-one-out by time.

    Each user's latest interaction becomes their test item, and with ``validation`` the one before
    it their validation item. Ties in time are broken by position in the input: of two events with
    the same timestamp, the one listed later counts as later. A repeated ``(user, item)`` pair
    counts once, at its latest time. A user needs at least 2 interactions (3 with ``validation``)
    to have anything held out; one with fewer keeps them all for training and gets ``-1``.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    timestamps = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    if not len(users) == len(items) == len(timestamps):
        raise DistillError(
            f"users, items and timestamps differ in length: {len(users)}, {len(items)}, {len(timestamps)}"
        )
    if len(users) == 0:
        raise DistillError("no interactions to split")
    user_ids, u = np.unique(users, return_inverse=True)
    item_ids, i = np.unique(items, return_inverse=True)
    u, i = u.reshape(-1), i.reshape(-1)
    position = np.arange(len(u))
    # chronological order within each user; np.lexsort sorts by the last key first
    order = np.lexsort((position, timestamps, u))
    u, i = u[order], i[order]
    # keep the latest event of each (user, item) pair: its last occurrence in this order
    pair = u * len(item_ids) + i
    _, last_from_end = np.unique(pair[::-1], return_index=True)
    keep = np.sort(len(pair) - 1 - last_from_end)
    u, i = u[keep], i[keep]

    num_users = len(user_ids)
    counts = np.bincount(u, minlength=num_users)
    ends = np.cumsum(counts)  # one past each user's last event (u is sorted)
    from_end = ends[u] - np.arange(len(u))  # 1 = the user's last event, 2 = second-to-last, ...
    held = 2 if validation else 1
    eligible = counts[u] > held  # at least one event must stay in training
    test_items = np.full(num_users, -1, dtype=np.int64)
    valid_items = np.full(num_users, -1, dtype=np.int64) if validation else None
    is_test = eligible & (from_end == 1)
    test_items[u[is_test]] = i[is_test]
    in_train = ~is_test
    if validation:
        is_valid = eligible & (from_end == 2)
        valid_items[u[is_valid]] = i[is_valid]
        in_train &= ~is_valid
    return Interactions(
        num_users=num_users,
        num_items=len(item_ids),
        train_users=torch.from_numpy(u[in_train].copy()),
        train_items=torch.from_numpy(i[in_train].copy()),
        test_items=torch.from_numpy(test_items),
        valid_items=torch.from_numpy(valid_items) if validation else None,
        user_ids=torch.from_numpy(user_ids),
        item_ids=torch.from_numpy(item_ids),
    )
