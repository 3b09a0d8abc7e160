"""Recommendation ranking: how a batch is fed, the teacher's signal, and the metrics.

A training batch is a candidate list per user (built by :class:`CandidateLoader`):

    {"user": int64 [B], "items": int64 [B, L], "target": float [B, L], "index": int64 [B]}

``items`` is ``[positive | n sampled negatives | the teacher's top-K unobserved items]``;
``target`` is 1 for the positive, 0 for a sampled negative and -1 for a teacher-proposed item
(unlabelled: ``bce`` skips it, ``rd`` distils it). :func:`feed` calls ``model(user, items)``, so
student and teacher both give ``[B, L]`` scores and the ranking losses (``pointwise_kd``,
``ranknet_kd``, ``listnet_kd``, ``rd``) fit the objective's ``("student", "teacher")`` inputs:

    distiller = Distiller(student, teacher, terms, feed=ranking.feed)

Evaluation is leave-one-out (He et al. 2017): each user's held-out item is ranked against
(a) 100 sampled negatives, fixed per user by a seed, and (b) every item outside the user's
training history ("full ranking"). Ranks are 0-based and pessimistic: a candidate that ties the
held-out item counts as ranked above it, so a model that scores everything alike earns nothing.

:class:`RankingTask` (``task: ranking`` in a recipe) wires the same pieces into the pipeline;
:func:`train_ranker` does it for a script (``benchmarks/ranking.py``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distill.data.interactions import Interactions
from distill.data.loader import derive_seed
from distill.data.types import DataSplits
from distill.errors import DistillError
from distill.signals import Batch

EVAL_NEGATIVES = 100
K = 10


def feed(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Ranking feed: ``model(batch["user"], batch["items"])`` -> ``[B, L]`` scores."""
    return model(batch["user"], batch["items"])


# -- training batches ---------------------------------------------------------------------------


def _sample_unseen(
    users: torch.Tensor, seen: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """int64 ``[len(users), count]`` items drawn uniformly among those each user has not seen
    (with replacement), by rejection."""
    num_items = seen.shape[1]
    draws = torch.randint(num_items, (len(users), count), generator=generator)
    for _ in range(1000):
        bad = seen[users[:, None].expand_as(draws), draws]
        if not bad.any():
            return draws
        draws[bad] = torch.randint(num_items, (int(bad.sum()),), generator=generator)
    raise DistillError("could not sample unseen items: some user has interacted with (nearly) every item")


class CandidateLoader:
    """Batches of candidate lists over every training interaction, for :class:`distill.Trainer`.

    Each training interaction ``(u, i)`` gives one list: ``i``, then ``negatives`` items drawn
    uniformly among those ``u`` has not interacted with in training (fresh each epoch), then the
    rows of ``teacher_top`` (``[num_users, K]``, the teacher's top-K unobserved items, see
    :func:`teacher_top_k`) when given. Deterministic in ``(seed, epoch)`` like
    :class:`distill.data.BatchLoader`, and sharded the same way across processes (``rank``,
    ``world_size``, set by the trainer; ``batch_size`` is global).

    ``on_epoch(epoch)`` is called by :meth:`set_epoch`, which the trainer calls before each epoch:
    a place to change a term's parameters on a schedule (Ranking Distillation's warm-up).
    """

    def __init__(
        self,
        interactions: Interactions,
        batch_size: int,
        *,
        negatives: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        teacher_top: torch.Tensor | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistillError(f"batch size must be a positive integer, got {batch_size!r}")
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise DistillError(f"negatives must be an integer >= 0, got {negatives!r}")
        if teacher_top is not None and (teacher_top.dim() != 2 or len(teacher_top) != interactions.num_users):
            raise DistillError(
                f"teacher_top must be [num_users={interactions.num_users}, K], got {tuple(teacher_top.shape)}"
            )
        self.interactions = interactions
        self.batch_size = batch_size
        self.negatives = negatives
        self.seed = int(seed)
        self.shuffle = shuffle
        self.teacher_top = None if teacher_top is None else teacher_top.long()
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.on_epoch = on_epoch
        self.epoch = 0
        self._seen = interactions.history()

    @property
    def list_length(self) -> int:
        return 1 + self.negatives + (0 if self.teacher_top is None else self.teacher_top.shape[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def __len__(self) -> int:
        n = self.interactions.num_train
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        n = self.interactions.num_train
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("order", self.seed, self.epoch)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.batch_size % self.world_size:
            raise DistillError(
                f"rank {self.rank} of {self.world_size} processes with batch size {self.batch_size}: the batch "
                "size is global and must be divisible by the number of processes"
            )
        order = self.order()
        inter = self.interactions
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            users, positives = inter.train_users[index], inter.train_items[index]
            # drawn for the whole global batch, then sliced: N processes see the 1-process batch
            generator = torch.Generator().manual_seed(derive_seed("negatives", self.seed, self.epoch, k))
            parts = [positives[:, None], _sample_unseen(users, self._seen, self.negatives, generator)]
            labels = [torch.ones(len(index), 1), torch.zeros(len(index), self.negatives)]
            if self.teacher_top is not None:
                parts.append(self.teacher_top[users])
                labels.append(torch.full((len(index), self.teacher_top.shape[1]), -1.0))
            shard = slice(self.rank, None, self.world_size)
            yield {
                "user": users[shard],
                "items": torch.cat(parts, 1)[shard],
                "target": torch.cat(labels, 1)[shard],
                "index": index[shard],
            }


# -- the teacher's signal -----------------------------------------------------------------------


@torch.no_grad()
def score_all(model: nn.Module, users: torch.Tensor | None = None, num_users: int | None = None,
              chunk: int = 128) -> torch.Tensor:
    """float32 ``[U, num_items]``: ``model``'s score of every item for each of ``users`` (default:
    all ``num_users`` users, or ``model.num_users``), in eval mode, on the CPU."""
    if users is None:
        users = torch.arange(num_users if num_users is not None else model.num_users)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = [model(part.to(device)).float().cpu() for part in users.split(chunk)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def teacher_top_k(scores: torch.Tensor, history: torch.Tensor, k: int = 10) -> torch.Tensor:
    """int64 ``[U, k]``: each user's ``k`` highest-scored items among those outside ``history``
    (bool ``[U, I]``), best first: the teacher's top-K unobserved items of Ranking Distillation."""
    if k > scores.shape[1]:
        raise DistillError(f"k = {k} is more than the {scores.shape[1]} items")
    return scores.masked_fill(history, -math.inf).topk(k, dim=1).indices


class ScoreTable:
    """A teacher signal read from a table of the teacher's scores, ``[num_users, num_items]``.

    The teacher is run once over every (user, item) pair (:meth:`from_model`); training then reads
    ``table[user, items]`` instead of running it. Same outputs as the live teacher in eval mode, for
    the price of ``num_users × num_items`` floats (6 MB for MovieLens 100K). It has no taps.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        if scores.dim() != 2:
            raise DistillError(f"a score table is [num_users, num_items], got {tuple(scores.shape)}")
        self.scores = scores.float()

    @classmethod
    def from_model(cls, model: nn.Module, num_users: int | None = None) -> "ScoreTable":
        return cls(score_all(model, num_users=num_users))

    def validate_taps(self, taps: Sequence[str]) -> None:
        if list(taps):
            raise DistillError(f"a score table holds only the teacher's scores; it has no taps ({', '.join(taps)})")

    def outputs(self, batch: Batch, taps: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        self.validate_taps(taps)
        users, items = batch["user"], batch["items"]
        rows = self.scores[users.cpu()[:, None], items.cpu()]
        return {"logits": rows.to(items.device)}


# -- metrics ------------------------------------------------------------------------------------


def target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of one target column per row: int64 ``[U]``.

    ``scores``: ``[U, L]``; ``target``: int64 ``[U]``, the column of each row's held-out item;
    ``exclude``: bool ``[U, L]``, columns that take no part (the user's training history). The rank
    is the number of other, non-excluded columns scoring at least as high as the target.
    """
    target = target.long().reshape(-1, 1)
    target_score = scores.gather(1, target)
    ahead = scores >= target_score
    if exclude is not None:
        ahead &= ~exclude
    ahead.scatter_(1, target, False)
    return ahead.sum(1)


def hit_rate(ranks: torch.Tensor, k: int = K) -> float:
    """HR@k: the fraction of users whose held-out item is among the top ``k`` (rank < k)."""
    return float((ranks < k).float().mean()) if len(ranks) else float("nan")


def ndcg(ranks: torch.Tensor, k: int = K) -> float:
    """NDCG@k with one relevant item: ``1 / log2(rank + 2)`` if rank < k else 0, mean over users."""
    if not len(ranks):
        return float("nan")
    gain = 1.0 / torch.log2(ranks.double() + 2)
    return float(torch.where(ranks < k, gain, torch.zeros_like(gain)).mean())


def top_k_overlap(student_scores: torch.Tensor, teacher_scores: torch.Tensor, history: torch.Tensor, k: int = K) -> float:
    """Mean fraction of the teacher's top-``k`` items (outside ``history``) that the student also puts
    in its top ``k``: the ranking counterpart of agreement with the teacher. Scores ``[U, I]``."""
    student_top = teacher_top_k(student_scores, history, k)
    teacher_top = teacher_top_k(teacher_scores, history, k)
    shared = (student_top[:, :, None] == teacher_top[:, None, :]).any(-1).float().sum(-1)
    return float((shared / k).mean())


def sample_eval_negatives(interactions: Interactions, n: int = EVAL_NEGATIVES, seed: int = 0) -> torch.Tensor:
    """int64 ``[num_users, n]``: for each user, ``n`` distinct items they never interacted with
    (training, validation or test), drawn from a generator seeded by ``(seed, user)`` alone, so a
    user's negatives do not depend on the other users or on the batch."""
    known = interactions.known()
    out = torch.empty(interactions.num_users, n, dtype=torch.long)
    for user in range(interactions.num_users):
        candidates = torch.nonzero(~known[user]).flatten()
        if len(candidates) < n:
            raise DistillError(
                f"user {user} has only {len(candidates)} items they never interacted with; cannot sample {n} negatives"
            )
        generator = torch.Generator().manual_seed(derive_seed("eval-negatives", seed, user))
        out[user] = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    interactions: Interactions,
    negatives: torch.Tensor | None,
    split: str = "test",
    k: int = K,
    full: bool = True,
    chunk: int = 256,
) -> dict[str, float]:
    """HR@k and NDCG@k of ``model`` (a ranker) on the held-out items of ``split``.

    ``hr10`` / ``ndcg10`` rank the held-out item against the user's ``negatives`` (rows of
    :func:`sample_eval_negatives`; skipped when ``None``); ``hr10_full`` / ``ndcg10_full`` against
    every item outside the user's history (training items, and on ``test`` the validation item).
    """
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    users = interactions.eval_users(split)
    held = interactions.held_out(split)[users]
    metrics: dict[str, float] = {}
    if negatives is not None:
        lists = torch.cat([held[:, None], negatives[users]], 1)
        scores = torch.cat([
            model(u.to(device), i.to(device)).float().cpu() for u, i in zip(users.split(chunk), lists.split(chunk))
        ]) if len(users) else torch.zeros(0, lists.shape[1])
        ranks = target_ranks(scores, torch.zeros(len(users), dtype=torch.long))
        metrics[f"hr{k}"], metrics[f"ndcg{k}"] = hit_rate(ranks, k), ndcg(ranks, k)
    if full:
        history = interactions.history()
        if split == "test" and interactions.valid_items is not None:
            valid_users = torch.nonzero(interactions.valid_items >= 0).flatten()
            history[valid_users, interactions.valid_items[valid_users]] = True
        ranks = []
        for u, h in zip(users.split(chunk), held.split(chunk)):
            scores = model(u.to(device)).float().cpu()
            ranks.append(target_ranks(scores, h, history[u]))
        ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
        metrics[f"hr{k}_full"], metrics[f"ndcg{k}_full"] = hit_rate(ranks, k), ndcg(ranks, k)
    model.train(was_training)
    return metrics


@torch.no_grad()
def scoring_latency_ms(model: nn.Module, num_users: int | None = None, repeats: int = 200, warmup: int = 20) -> float:
    """Median milliseconds to score every item for one user (``model(user)``, batch of 1), on the
    CPU with the current ``torch.get_num_threads()``; users taken in turn."""
    was_training = model.training
    model.eval()
    num_users = num_users if num_users is not None else model.num_users
    users = [torch.tensor([u % num_users]) for u in range(repeats + warmup)]
    for u in users[:warmup]:
        model(u)
    times = []
    for u in users[warmup:]:
        start = time.perf_counter()
        model(u)
        times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times) * 1000.0


# -- training -----------------------------------------------------------------------------------


def set_term_params(terms: Sequence, name: str, schedule: Callable[[int], dict]) -> Callable[[int], None]:
    """An ``on_epoch`` hook for :class:`CandidateLoader` that updates term ``name``'s parameters
    each epoch with ``schedule(epoch)``. For Ranking Distillation's warm-up::

        set_term_params(terms, "rd", lambda e: {"weighting": "position" if e < 2 else "hybrid"})

    (The objective reads ``term.params`` at every step, so the change applies from that epoch on.)
    """
    matches = [t for t in terms if t.name == name]
    if not matches:
        raise DistillError(f"no term named '{name}'; terms: {', '.join(t.name for t in terms)}")

    def hook(epoch: int) -> None:
        matches[0].params.update(schedule(epoch))

    return hook


def train_ranker(
    student: nn.Module,
    interactions: Interactions,
    terms: Sequence,
    config,
    *,
    teacher: nn.Module | object | None = None,
    batch_size: int = 256,
    negatives: int = 4,
    teacher_top: torch.Tensor | None = None,
    on_epoch: Callable[[int], None] | None = None,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    run_dir=None,
    name: str = "ranking",
    check: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``student`` with ``terms`` (a list of :class:`distill.Term`) on candidate lists.

    ``teacher`` is a ranker (run live through :func:`feed`), a :class:`ScoreTable`, or ``None``
    for the student alone; ``config`` a :class:`distill.TrainConfig` (its ``seed`` also seeds the
    negatives). ``evaluate_fn(student)`` runs after each epoch; its metrics are logged with a
    ``val_`` prefix (``restore_best`` and early stopping need ``config.monitor``, e.g. ``"val_ndcg10"``).
    ``check`` runs :meth:`Distiller.dry_run` on the first batch and raises on any problem it finds.
    Returns the trained student and the per-epoch metrics.
    """
    from distill.stage import assemble_stage

    loader = CandidateLoader(
        interactions, batch_size, negatives=negatives, seed=config.seed, teacher_top=teacher_top, on_epoch=on_epoch
    )
    stage = assemble_stage(name, student, teacher, list(terms), feed=feed, loader=loader, config=config,
                           evaluate=evaluate_fn)
    # ``check``: one batch through every term, so a NaN, a zero or a missing gradient fails here, not at epoch 3
    return stage.fit(run_dir=run_dir, check=check)


# -- the task, for recipes (``task: ranking``) --------------------------------------------------
from pydantic import Field  # noqa: E402

from distill.tasks.base import TASKS, Task, TaskOptions, parse_options  # noqa: E402


class RankingOptions(TaskOptions):
    """``task_options`` of ranking."""

    negatives: int = Field(4, ge=1)  # sampled negatives per training positive
    eval_negatives: int = Field(EVAL_NEGATIVES, ge=1)  # sampled negatives per user at evaluation, fixed
    eval_seed: int = 0  # the seed that draws them


# before 2026-12: the task's options were given in data.options; still read there (not both places)
_LEGACY = tuple(RankingOptions.model_fields)


@dataclass
class PreparedRanking:
    """What :meth:`RankingTask.prepare` loads once for a run."""

    data: DataSplits
    interactions: Interactions
    negatives: torch.Tensor  # [num_users, eval_negatives], fixed per user
    train_negatives: int
    train: object  # the training interactions (its len is the number of samples)
    val_loader: object | None  # not None when the data was split with validation=True


@TASKS.register("ranking")
class RankingTask(Task):
    """Implicit-feedback recommendation: candidate lists in, HR@10 / NDCG@10 out.

    Task options (``task_options``): ``negatives`` (sampled negatives per training positive,
    default 4), ``eval_negatives`` (100) and ``eval_seed`` (0); recipes written before they moved
    there may still give them in ``data.options``. Models come
    from :mod:`distill.models.ranking` (``model: mf``, ``kwargs: {dim: 8}``). The primary metric
    is NDCG@10 against the sampled negatives; ``hr10``, ``hr10_full``, ``ndcg10_full`` and, for
    students, ``top10_overlap`` with the teacher come with it. Training lists hold no teacher
    top-K items here (the task does not see the teacher when it builds them): ``rd`` then distils
    the teacher's top items among the candidates.
    """

    name = "ranking"
    primary_metric = "ndcg10"
    teacher_cache = None
    feed = staticmethod(feed)
    Options = RankingOptions

    def options(self, recipe) -> RankingOptions:
        given = dict(getattr(recipe, "task_options", None) or {})
        legacy = {k: recipe.data.options[k] for k in _LEGACY if k in recipe.data.options}
        both = sorted(set(legacy) & set(given))
        if both:
            raise DistillError(f"ranking: {', '.join(both)} given in both data.options and task_options; "
                               "keep task_options")
        return parse_options(RankingOptions, {**legacy, **given}, self.name)

    def data_options(self, recipe) -> dict:
        """The data set's options, without the task options older recipes gave there."""
        from distill.data.registry import data_options_model, parse_data_options

        options = {k: v for k, v in recipe.data.options.items() if k not in _LEGACY}
        return parse_data_options(recipe.data.name, data_options_model(recipe.data.name), options)

    def prepare(self, recipe, data_dir) -> PreparedRanking:
        from distill.data import load_dataset

        task_options = self.options(recipe)
        data = load_dataset(recipe.data.name, data_dir, **self.data_options(recipe))
        interactions = data.extra.get("interactions")
        if not isinstance(interactions, Interactions):
            raise DistillError(
                f"data set '{recipe.data.name}' holds no user-item interactions; task 'ranking' needs one such as ml-100k"
            )
        negatives = sample_eval_negatives(interactions, task_options.eval_negatives, task_options.eval_seed)
        return PreparedRanking(
            data=data, interactions=interactions, negatives=negatives,
            train_negatives=task_options.negatives, train=data.train,
            val_loader=data.extra.get("validation"),
        )

    def describe(self, prepared: PreparedRanking) -> str:
        inter = prepared.interactions
        return (
            f"{prepared.data.name}: {inter.num_users} users, {inter.num_items} items, {inter.num_train} training "
            f"interactions, {len(inter.eval_users('test'))} test users (leave-one-out)"
        )

    def train_loader(self, recipe, prepared: PreparedRanking, batch_size: int, seed: int, labelled_only: bool = False) -> CandidateLoader:
        return CandidateLoader(prepared.interactions, batch_size, negatives=prepared.train_negatives, seed=seed)

    def build_model(self, spec, prepared: PreparedRanking, seed: int) -> nn.Module:
        from distill.models.ranking import create_ranker
        from distill.models.weights import load_weights

        torch.manual_seed(seed)
        inter = prepared.interactions
        model = create_ranker(spec.model, inter.num_users, inter.num_items, **spec.kwargs)
        if spec.weights is not None:
            load_weights(model, spec.weights)
        return model

    def check_models(self, teacher: nn.Module, student: nn.Module, prepared: PreparedRanking) -> None:
        inter = prepared.interactions
        for role, model in (("teacher", teacher), ("student", student)):
            sizes = (getattr(model, "num_users", None), getattr(model, "num_items", None))
            if sizes != (inter.num_users, inter.num_items):
                raise DistillError(
                    f"the {role} scores {sizes[0]} users x {sizes[1]} items, but the data has "
                    f"{inter.num_users} x {inter.num_items}"
                )

    def reference(self, teacher: nn.Module, prepared: PreparedRanking) -> torch.Tensor:
        return score_all(teacher, num_users=prepared.interactions.num_users)

    def evaluate(self, model: nn.Module, prepared: PreparedRanking, reference=None, split: str = "test") -> dict[str, float]:
        inter = prepared.interactions
        metrics = evaluate(model, inter, prepared.negatives, split="test" if split == "test" else "valid")
        if reference is not None and split == "test":
            metrics["top10_overlap"] = top_k_overlap(score_all(model, num_users=inter.num_users), reference, inter.history())
        return metrics

    def example_inputs(self, prepared: PreparedRanking, n: int) -> torch.Tensor:
        return torch.arange(n) % prepared.interactions.num_users  # user ids: the model scores every item

    def latency_input(self, prepared: PreparedRanking) -> torch.Tensor:
        return torch.tensor([0])  # one user: the model scores every item
