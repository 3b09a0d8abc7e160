"""Recommendation ranking: the ranking losses, HR/NDCG, the leave-one-out split, the verified
MovieLens download (from 127.0.0.1 only), the models and a short end-to-end distillation."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import math
import threading
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from distill import Term, TrainConfig
from distill.data import load_dataset
from distill.data import movielens
from distill.data.interactions import Interactions, leave_one_out
from distill.errors import DistillError
from distill.losses import bce_loss, get_loss, listnet_kd_loss, pointwise_kd_loss, ranknet_kd_loss, rd_loss
from distill.models.ranking import create_ranker
from distill.objective import Distiller
from distill.tasks import ranking as R

LN2, LN3 = math.log(2), math.log(3)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- losses: hand-computed values ---------------------------------------------------------------


def test_bce_by_hand_and_unlabelled_entries_are_skipped():
    s = torch.tensor([[0.0, LN3, 7.0]])
    y = torch.tensor([[1.0, 0.0, -1.0]])
    # BCE(0 | 1) = ln 2; BCE(ln 3 | 0) = -ln(1 - 3/4) = ln 4; the -1 entry takes no part
    assert bce_loss(s, y).item() == pytest.approx((LN2 + 2 * LN2) / 2, rel=1e-6)
    assert bce_loss(s[:, 2:], y[:, 2:]).item() == 0.0


def test_pointwise_kd_by_hand():
    # T = 2: teacher 2 ln 3 -> sigmoid(ln 3) = 3/4; student 0 -> 1/2; BCE = ln 2; times T^2 = 4
    s, t = torch.tensor([[0.0]]), torch.tensor([[2 * LN3]])
    assert pointwise_kd_loss(s, t, temperature=2.0).item() == pytest.approx(4 * LN2, rel=1e-6)
    # swapped: target 1/2, student 3/4 -> -(ln 3/4 + ln 1/4) / 2 = ln(16/3) / 2; times 4
    assert pointwise_kd_loss(t, s, temperature=2.0).item() == pytest.approx(2 * math.log(16 / 3), rel=1e-6)
    # the mean over entries
    two = pointwise_kd_loss(torch.tensor([[0.0, 2 * LN3]]), torch.tensor([[2 * LN3, 0.0]]), temperature=2.0)
    assert two.item() == pytest.approx((4 * LN2 + 2 * math.log(16 / 3)) / 2, rel=1e-6)


def test_ranknet_kd_by_hand():
    # pairs (0,1), (0,2), (1,2). Student differences ln 3, ln 3, 0 -> 3/4, 3/4, 1/2; teacher all 1/2
    s, t = torch.tensor([[LN3, 0.0, 0.0]]), torch.zeros(1, 3)
    pair = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))  # BCE(3/4 | 1/2)
    assert ranknet_kd_loss(s, t).item() == pytest.approx((2 * pair + LN2) / 3, rel=1e-6)
    # the teacher is tempered, the student is not: (2 ln 3) / 2 -> 3/4 on both sides -> entropy of 3/4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    value = ranknet_kd_loss(torch.tensor([[LN3, 0.0]]), torch.tensor([[2 * LN3, 0.0]]), temperature=2.0)
    assert value.item() == pytest.approx(entropy, rel=1e-6)


def test_listnet_kd_by_hand():
    # teacher softmax at T = 2 of (2 ln 3, 0) is (3/4, 1/4); student uniform -> cross-entropy ln 2, times 4
    value = listnet_kd_loss(torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]]), temperature=2.0)
    assert value.item() == pytest.approx(4 * LN2, rel=1e-6)
    # teacher uniform, student (3/4, 1/4): -(ln 3/4 + ln 1/4) / 2; the batch mean of two equal rows
    value = listnet_kd_loss(torch.tensor([[LN3, 0.0], [0.0, LN3]]), torch.zeros(2, 2))
    assert value.item() == pytest.approx(0.5 * math.log(16 / 3), rel=1e-6)


def test_rd_position_weights_by_hand():
    # observed item in column 0 (never distilled); teacher's top-2 unobserved: column 2 (3), column 3 (2)
    labels = torch.tensor([[1.0, 0.0, -1.0, -1.0]])
    teacher = torch.tensor([[5.0, 1.0, 3.0, 2.0]])
    student = torch.tensor([[0.0, 0.0, 0.0, LN3]])
    w1, w2 = math.exp(-1), math.exp(-2)  # exp(-r / lambda), lambda = 1, then normalised
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    expected = w1 * LN2 + w2 * math.log(4 / 3)  # -log sigmoid(0), -log sigmoid(ln 3)
    value = rd_loss(student, teacher, labels, k=2, lam=1.0, weighting="position")
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # lambda = 2 flattens the weights: exp(-1/2), exp(-1)
    v1, v2 = math.exp(-0.5), math.exp(-1)
    expected = (v1 * LN2 + v2 * math.log(4 / 3)) / (v1 + v2)
    assert rd_loss(student, teacher, labels, k=2, lam=2.0, weighting="position").item() == pytest.approx(expected, rel=1e-6)


def test_rd_hybrid_weights_by_hand():
    labels = torch.tensor([[1.0, 0.0, 0.0, -1.0, -1.0]])
    teacher = torch.tensor([[5.0, 1.0, 0.0, 3.0, 2.0]])  # top-2 unobserved: column 3 (r=1), column 4 (r=2)
    student = torch.tensor([[9.0, 2.0, -0.5, 0.0, -1.0]])
    # the student's rank among the 4 unobserved candidates: column 3 (0.0) is beaten by column 1 only
    # -> rank 2; column 4 (-1.0) by columns 1, 2, 3 -> rank 4. Discrepancies 2 - 1 = 1 and 4 - 2 = 2.
    mu = 0.5
    wa = [math.exp(-1), math.exp(-2)]
    wb = [math.tanh(mu * 1), math.tanh(mu * 2)]
    w = [a * b for a, b in zip(wa, wb)]
    expected = (w[0] * LN2 + w[1] * math.log(1 + math.e)) / sum(w)  # -log sigmoid(0), -log sigmoid(-1)
    assert rd_loss(student, teacher, labels, k=2, lam=1.0, mu=mu).item() == pytest.approx(expected, rel=1e-6)
    # scaled to a catalogue of 7 items: 3 other unobserved candidates stand for 6 items, so counts double:
    # ranks 1 + 2 = 3 and 1 + 6 = 7, discrepancies 2 and 5
    wb = [math.tanh(mu * 2), math.tanh(mu * 5)]
    w = [a * b for a, b in zip(wa, wb)]
    expected = (w[0] * LN2 + w[1] * math.log(1 + math.e)) / sum(w)
    value = rd_loss(student, teacher, labels, k=2, lam=1.0, mu=mu, num_items=7)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_rd_never_distils_observed_items_and_handles_short_lists():
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    teacher = torch.tensor([[9.0, 8.0, 1.0]])
    student = torch.tensor([[0.0, 0.0, LN3]])
    # only column 2 is unobserved: it gets all the weight even though k = 3
    value = rd_loss(student, teacher, labels, k=3, weighting="position")
    assert value.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert rd_loss(student, teacher, torch.ones(1, 3), k=3).item() == 0.0  # nothing to distil


def test_losses_are_registered_with_their_inputs():
    assert get_loss("bce").inputs == ("student", "labels")
    for name in ("pointwise_kd", "ranknet_kd", "listnet_kd"):
        assert get_loss(name).inputs == ("student", "teacher")
        assert get_loss(name).param_names() == ["temperature"]
    assert get_loss("rd").inputs == ("student", "teacher", "labels")
    assert set(get_loss("rd").param_names()) == {"k", "lam", "mu", "weighting", "num_items"}
    with pytest.raises(ValueError, match="temperature"):
        listnet_kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0)
    with pytest.raises(ValueError, match="weighting"):
        rd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), weighting="fancy")
    with pytest.raises(ValueError, match="differ in shape|one shape"):
        ranknet_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# -- losses: properties -------------------------------------------------------------------------

TEACHER_LOSSES = {
    "pointwise_kd": lambda s, t, y: pointwise_kd_loss(s, t, temperature=2.0),
    "ranknet_kd": lambda s, t, y: ranknet_kd_loss(s, t),
    "listnet_kd": lambda s, t, y: listnet_kd_loss(s, t, temperature=2.0),
}
ALL_LOSSES = {
    **TEACHER_LOSSES,
    "bce": lambda s, t, y: bce_loss(s, y),
    "rd": lambda s, t, y: rd_loss(s, t, y, k=3, num_items=50),
}


def _lists(batch: int = 5, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, generator=g)
    t = 3 * torch.randn(batch, length, generator=g)
    y = torch.zeros(batch, length)
    y[:, 0] = 1
    y[:, -3:] = -1
    return s, t, y


@pytest.mark.parametrize("name", sorted(TEACHER_LOSSES))
def test_minimal_when_student_equals_teacher(name):
    _, t, y = _lists()
    s = t.clone().requires_grad_(True)
    at_teacher = TEACHER_LOSSES[name](s, t, y)
    (grad,) = torch.autograd.grad(at_teacher, s)
    assert grad.abs().max() < 1e-6, "a stationary point at s = t"
    for seed in range(5):
        moved = t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
        assert TEACHER_LOSSES[name](moved, t, y) > at_teacher


def test_rd_is_zero_when_the_student_ranks_like_the_teacher():
    _, t, y = _lists()
    assert rd_loss(t.clone(), t, y, k=3).item() == 0.0  # hybrid: no discrepancy, no weight
    assert rd_loss(t.clone(), t, y, k=3, weighting="position").item() > 0  # position weights alone still pull


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_gradient_reaches_the_student(name):
    s, t, y = _lists()
    s.requires_grad_(True)
    ALL_LOSSES[name](s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_permutation_invariance(name):
    s, t, y = _lists(batch=6, length=9, seed=3)
    value = ALL_LOSSES[name](s, t, y)
    rows = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    assert ALL_LOSSES[name](s[rows], t[rows], y[rows]).item() == pytest.approx(value.item(), rel=1e-5)
    columns = torch.randperm(9, generator=torch.Generator().manual_seed(2))  # the order of a candidate list
    assert ALL_LOSSES[name](s[:, columns], t[:, columns], y[:, columns]).item() == pytest.approx(value.item(), rel=1e-5)


# -- metrics ------------------------------------------------------------------------------------


def test_ranks_hr_ndcg_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.7],  # target column 0: nothing above it -> rank 0
        [0.2, 0.1, 0.5, 0.7],  # two above -> rank 2
        [0.5, 0.5, 0.5, 0.1],  # ties count against the target -> rank 2
        [0.1, 0.9, 0.8, 0.2],  # target column 3; columns 1, 2 above -> 2, but column 1 is excluded -> 1
    ])
    target = torch.tensor([0, 0, 0, 3])
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[3, 1] = True
    ranks = R.target_ranks(scores, target, exclude)
    assert ranks.tolist() == [0, 2, 2, 1]
    assert R.hit_rate(ranks, k=1) == 0.25 and R.hit_rate(ranks, k=2) == 0.5 and R.hit_rate(ranks, k=3) == 1.0
    # NDCG@2: 1/log2(2) + 1/log2(3) over 4 users; NDCG@3 adds 1/log2(4) twice
    assert R.ndcg(ranks, k=2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert R.ndcg(ranks, k=3) == pytest.approx((1 + 1 / math.log2(3) + 2 * 0.5) / 4)


def test_top_k_overlap_by_hand():
    history = torch.tensor([[True, False, False, False, False]])
    teacher = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0]])  # top-2 outside history: items 1, 2
    student = torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.2]])  # top-2 outside history: items 1, 3
    assert R.top_k_overlap(student, teacher, history, k=2) == 0.5
    assert R.top_k_overlap(teacher, teacher, history, k=2) == 1.0


class FixedScores(nn.Module):
    """A 'ranker' that returns a fixed table of scores."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.num_users, self.num_items = table.shape
        self.anchor = nn.Parameter(torch.zeros(()))  # so it has a device

    def forward(self, users, items=None):
        rows = self.table[users]
        return rows if items is None else rows.gather(1, items)


def test_evaluate_sampled_and_full_by_hand():
    # 2 users, 6 items. User 0: train {0, 1}, valid 2, test 3; user 1: train {4}, valid 5, test 0.
    inter = Interactions(
        num_users=2, num_items=6,
        train_users=torch.tensor([0, 0, 1]), train_items=torch.tensor([0, 1, 4]),
        test_items=torch.tensor([3, 0]), valid_items=torch.tensor([2, 5]),
    )
    table = torch.tensor([
        [9.0, 8.0, 7.0, 5.0, 6.0, 1.0],   # test item 3 (5.0): above it 0, 1 (train), 2 (valid), 4 -> full rank 1
        [1.0, 2.0, 3.0, 0.0, 9.0, 8.0],   # test item 0 (1.0): above it 1, 2, 4 (train), 5 (valid) -> full rank 2
    ])
    model = FixedScores(table)
    negatives = torch.tensor([[4, 5], [3, 1]])  # never a known item
    m = R.evaluate(model, inter, negatives, k=2)
    # sampled: user 0 ranks 3 against {4, 5}: 4 is above -> rank 1 (hit@2); user 1 ranks 0 against {3, 1}: rank 1
    assert m["hr2"] == 1.0 and m["ndcg2"] == pytest.approx(1 / math.log2(3))
    # full: user 0 rank 1 (hit), user 1 rank 2 (miss at k = 2)
    assert m["hr2_full"] == 0.5 and m["ndcg2_full"] == pytest.approx(0.5 / math.log2(3))
    # on the validation split the test item is unknown, the validation item is the target
    v = R.evaluate(model, inter, None, split="valid", k=2)
    # user 0: item 2 (7.0) below train items only -> rank 0; user 1: item 5 (8.0): above it 4 (train) -> 0
    assert v == {"hr2_full": 1.0, "ndcg2_full": 1.0}


def test_eval_negatives_are_fixed_per_user_and_unseen():
    inter = _synthetic(users=30, items=40)
    a = R.sample_eval_negatives(inter, n=10, seed=5)
    b = R.sample_eval_negatives(inter, n=10, seed=5)
    assert torch.equal(a, b) and a.shape == (30, 10)
    known = inter.known()
    for u in range(30):
        assert len(set(a[u].tolist())) == 10 and not known[u, a[u]].any()
    assert not torch.equal(a, R.sample_eval_negatives(inter, n=10, seed=6))
    # a user's negatives do not depend on the other users
    one = Interactions(1, inter.num_items, inter.train_users[inter.train_users == 0],
                       inter.train_items[inter.train_users == 0], inter.test_items[:1])
    assert torch.equal(R.sample_eval_negatives(one, n=10, seed=5)[0], a[0])


# -- the leave-one-out split and the data module ------------------------------------------------

TINY_U_DATA = (
    # user item rating time
    "10\t100\t5\t1000\n"
    "10\t200\t1\t3000\n"
    "10\t300\t3\t2000\n"
    "10\t400\t4\t3000\n"   # same time as item 200 but later in the file: the last one
    "20\t200\t2\t10\n"
    "20\t100\t4\t20\n"
    "20\t200\t5\t30\n"     # a repeat of (20, 200): counts once, at time 30
    "30\t300\t1\t5\n"      # a user with one interaction: nothing to hold out
    "\n"
)


def test_leave_one_out_on_a_tiny_u_data():
    rows = movielens.parse_u_data(TINY_U_DATA.encode())
    assert rows.shape == (8, 4)
    inter = movielens.movielens_interactions(rows)
    assert inter.user_ids.tolist() == [10, 20, 30] and inter.item_ids.tolist() == [100, 200, 300, 400]
    # user 10: order 100 (1000), 300 (2000), 200 (3000), 400 (3000, later line) -> test 400
    # user 20: 100 (20), 200 (30, its repeat's later time) -> test 200; user 30 keeps item 300
    assert inter.test_items.tolist() == [3, 1, -1]
    train = sorted(zip(inter.train_users.tolist(), inter.train_items.tolist()))
    assert train == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 2)]
    assert inter.valid_items is None

    inter = movielens.movielens_interactions(rows, validation=True)
    # user 10: valid 200, test 400; user 20 has only 2 distinct items: needs 3 for both -> keeps all
    assert inter.test_items.tolist() == [3, -1, -1] and inter.valid_items.tolist() == [1, -1, -1]
    train = sorted(zip(inter.train_users.tolist(), inter.train_items.tolist()))
    assert train == [(0, 0), (0, 2), (1, 0), (1, 1), (2, 2)]
    assert inter.eval_users("valid").tolist() == [0]


def test_u_data_parse_errors_name_the_line():
    with pytest.raises(DistillError, match="line 2 is not"):
        movielens.parse_u_data(b"1\t2\t3\t4\n1\t2\tx\t4\n")
    with pytest.raises(DistillError, match="line 1 is not"):
        movielens.parse_u_data(b"1\t2\t3\n4\t5\t6\t7\t8\n")
    with pytest.raises(DistillError, match="no ratings"):
        movielens.parse_u_data(b"\n\n")


def test_local_folder_is_verified(shared, tmp_path):
    data = load_dataset("ml-100k", tmp_path, path=shared / "ml-100k")
    inter = data.extra["interactions"]
    assert (inter.num_users, inter.num_items) == (943, 1682)
    assert inter.num_train == 100_000 - 943 and (inter.test_items >= 0).all()
    assert data.num_classes == 1682 and data.train.inputs.shape == (99_057, 1) and len(data.test) == 943
    # a modified copy is refused unless verify=False
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "u.data").write_text(TINY_U_DATA)
    with pytest.raises(DistillError, match="not the official u.data.*verify=False"):
        load_dataset("ml-100k", tmp_path, path=tmp_path / "mine")
    mine = load_dataset("ml-100k", tmp_path, path=tmp_path / "mine", verify=False, validation=True)
    assert mine.extra["interactions"].num_users == 3 and mine.extra["validation"] is not None
    with pytest.raises(DistillError, match="holds no u.data"):
        load_dataset("ml-100k", tmp_path, path=tmp_path / "nowhere")


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_is_checksum_verified(shared, tmp_path, monkeypatch):
    """The GroupLens path against a local server: a stand-in archive holding the real u.data."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-100k/u.data", (shared / "ml-100k" / "u.data").read_bytes())
        zf.writestr("ml-100k/README", "stand-in")
    archive = mirror / "ml-100k.zip"
    archive.write_bytes(buffer.getvalue())
    _Handler.requests.clear()
    with serve(mirror) as url:
        monkeypatch.setattr(movielens, "ML100K_MIRRORS", [url + "official/"])  # never the real site from a test
        with pytest.raises(DistillError, match="checksum mismatch.*expected sha256 50d2a982"):
            load_dataset("ml-100k", tmp_path / "data", mirror=url)  # the real digest refuses the stand-in
        assert list((tmp_path / "data" / "ml-100k").iterdir()) == [], "no partial or unverified file left"
        assert _Handler.requests == ["/ml-100k.zip", "/official/ml-100k.zip"]

        monkeypatch.setattr(movielens, "ML100K_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        _Handler.requests.clear()
        data = load_dataset("ml-100k", tmp_path / "data", mirror=url)
        assert data.extra["interactions"].num_users == 943 and _Handler.requests == ["/ml-100k.zip"]
        assert sorted(p.name for p in (tmp_path / "data" / "ml-100k").iterdir()) == ["ml-100k.zip"], "nothing extracted"
        again = load_dataset("ml-100k", tmp_path / "data", mirror=url, download=False)
        assert torch.equal(again.train.targets, data.train.targets) and len(_Handler.requests) == 1

        # an archive whose digest verifies but whose u.data is not the official one is refused too
        bad = io.BytesIO()
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("ml-100k/u.data", TINY_U_DATA)
        archive.write_bytes(bad.getvalue())
        monkeypatch.setattr(movielens, "ML100K_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        with pytest.raises(DistillError, match="not the official u.data"):
            load_dataset("ml-100k", tmp_path / "other", mirror=url)


def test_missing_archive_without_download(tmp_path):
    with pytest.raises(DistillError, match="download=True"):
        load_dataset("ml-100k", tmp_path, download=False)


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("mf", {"dim": 8}), ("neumf", {"dim": 8, "layers": (16, 8, 4)})])
def test_ranker_shapes_agree(name, kwargs):
    torch.manual_seed(0)
    model = create_ranker(name, num_users=5, num_items=7, **kwargs)
    for p in model.parameters():  # make every part matter
        nn.init.normal_(p, std=0.5)
    users = torch.tensor([0, 3, 4])
    items = torch.tensor([[1, 2, 6], [0, 0, 5], [3, 4, 2]])
    lists = model(users, items)
    every = model(users)
    assert lists.shape == (3, 3) and every.shape == (3, 7)
    assert torch.allclose(lists, every.gather(1, items), atol=1e-6)
    assert torch.allclose(model(users, items[:, 0]), lists[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="items must be"):
        model(users, torch.zeros(2, 3, dtype=torch.long))


def test_unknown_ranker_and_bad_options():
    with pytest.raises(DistillError, match="unknown ranking model 'mff'"):
        create_ranker("mff", 3, 3)
    with pytest.raises(DistillError, match="dim"):
        create_ranker("mf", 3, 3, dim=0)
    with pytest.raises(DistillError, match="ranking model 'mf'"):
        create_ranker("mf", 3, 3, width=4)
    own = create_ranker("distill.models.ranking:MatrixFactorization", 3, 4, dim=2)  # your own, by import path
    assert own(torch.tensor([0, 2])).shape == (2, 4)


# -- batches, teacher signal, training ----------------------------------------------------------


def _synthetic(users: int = 60, items: int = 40, groups: int = 4, per_user: int = 7, seed: int = 0) -> Interactions:
    """Users in ``groups`` taste groups, each interacting with ``per_user`` items of its group's
    ``items / groups``, in random time order."""
    rng = np.random.default_rng(seed)
    size = items // groups
    rows = []
    for u in range(users):
        group = u % groups
        chosen = rng.choice(size, per_user, replace=False) + group * size
        for time, item in enumerate(rng.permutation(chosen)):
            rows.append((u, item, time))
    rows = np.array(rows)
    return leave_one_out(rows[:, 0], rows[:, 1], rows[:, 2])


def test_candidate_batches():
    inter = _synthetic()
    top = torch.arange(3).repeat(inter.num_users, 1)
    loader = R.CandidateLoader(inter, 32, negatives=5, seed=1, teacher_top=top)
    assert len(loader) == math.ceil(inter.num_train / 32) and loader.list_length == 9
    seen = inter.history()
    batches = list(loader)
    for batch in batches:
        users, items, target = batch["user"], batch["items"], batch["target"]
        assert items.shape == (len(users), 9) and target.shape == items.shape
        assert target[:, 0].eq(1).all() and target[:, 1:6].eq(0).all() and target[:, 6:].eq(-1).all()
        assert seen[users, items[:, 0]].all(), "column 0 is a training interaction"
        assert not seen[users[:, None].expand(-1, 5), items[:, 1:6]].any(), "negatives are unseen"
        assert torch.equal(items[:, 6:], top[users])
    covered = torch.cat([b["index"] for b in batches]).sort().values
    assert torch.equal(covered, torch.arange(inter.num_train)), "every interaction once per epoch"
    again = list(R.CandidateLoader(inter, 32, negatives=5, seed=1, teacher_top=top))
    assert all(torch.equal(a["items"], b["items"]) for a, b in zip(batches, again)), "deterministic"
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["items"], batches[0]["items"]), "a new epoch, new negatives"
    # two processes: their shards interleave back into the single-process batch
    shards = [next(iter(R.CandidateLoader(inter, 32, negatives=5, seed=1, rank=r, world_size=2))) for r in (0, 1)]
    whole = next(iter(R.CandidateLoader(inter, 32, negatives=5, seed=1)))
    assert torch.equal(torch.stack([shards[0]["items"], shards[1]["items"]], 1).reshape(-1, 6), whole["items"])
    calls = []
    R.CandidateLoader(inter, 32, on_epoch=calls.append).set_epoch(4)
    assert calls == [4]


def test_score_table_matches_the_live_teacher():
    inter = _synthetic()
    torch.manual_seed(0)
    teacher = create_ranker("mf", inter.num_users, inter.num_items, dim=16, init_std=0.5)
    table = R.ScoreTable.from_model(teacher)
    batch = next(iter(R.CandidateLoader(inter, 16, negatives=4, seed=0)))
    assert torch.allclose(table.outputs(batch)["logits"], teacher(batch["user"], batch["items"]), atol=1e-6)
    student = create_ranker("mf", inter.num_users, inter.num_items, dim=4)
    terms = [Term("hard", "bce", weight=0.5), Term("soft", "listnet_kd", weight=0.5, params={"temperature": 2.0})]
    live = Distiller(student, teacher, terms, feed=R.feed)(batch)
    cached = Distiller(student, table, terms, feed=R.feed)(batch)
    assert torch.allclose(live.loss, cached.loss, atol=1e-6)
    with pytest.raises(DistillError, match="no taps"):
        table.validate_taps(["layer1"])
    top = R.teacher_top_k(table.scores, inter.history(), 3)
    assert not inter.history().gather(1, top).any()


def test_end_to_end_training_beats_random():
    inter = _synthetic()
    negatives = R.sample_eval_negatives(inter, n=20, seed=0)

    def metrics(model):
        return R.evaluate(model, inter, negatives, k=5)

    torch.manual_seed(0)
    random_model = create_ranker("mf", inter.num_users, inter.num_items, dim=4)
    chance = metrics(random_model)
    config = TrainConfig(epochs=8, lr=0.05, progress=False, tensorboard=False, restore_best=False, seed=0, cpu=True)

    torch.manual_seed(1)
    teacher = create_ranker("mf", inter.num_users, inter.num_items, dim=16)
    teacher, history = R.train_ranker(teacher, inter, [Term("hard", "ce")], config, negatives=10, batch_size=32,
                                      evaluate_fn=metrics)
    assert len(history) == 8 and "val_hr5_full" in history[-1]
    taught = metrics(teacher)
    assert taught["hr5"] > chance["hr5"] + 0.3 and taught["hr5_full"] > chance["hr5_full"] + 0.3

    table = R.ScoreTable.from_model(teacher)
    top = R.teacher_top_k(table.scores, inter.history(), 3)
    recipes = {
        "alone": [Term("hard", "bce")],
        "pointwise": [Term("hard", "bce", weight=0.5), Term("soft", "pointwise_kd", weight=0.5)],
        "pairwise": [Term("hard", "bce", weight=0.5), Term("soft", "ranknet_kd", weight=0.5)],
        "listwise": [Term("hard", "bce", weight=0.5), Term("soft", "listnet_kd", weight=0.5, params={"temperature": 2.0})],
        "rd": [Term("hard", "bce", weight=0.8), Term("rd", "rd", weight=0.2, params={"k": 3, "num_items": inter.num_items})],
    }
    for name, terms in recipes.items():
        torch.manual_seed(2)
        student = create_ranker("mf", inter.num_users, inter.num_items, dim=4)
        hook = R.set_term_params(terms, "rd", lambda e: {"weighting": "position" if e < 2 else "hybrid"}) if name == "rd" else None
        student, _ = R.train_ranker(student, inter, terms, config, negatives=4, batch_size=32,
                                    teacher=None if name == "alone" else table,
                                    teacher_top=None if name == "alone" else top, on_epoch=hook)
        result = metrics(student)
        assert result["hr5"] > chance["hr5"] + 0.2, (name, result, chance)
        assert result["ndcg5_full"] > chance["ndcg5_full"] + 0.1, (name, result, chance)
    assert terms[1].params["weighting"] == "hybrid", "the warm-up hook switched the weighting"


def test_ranking_task_for_recipes(tmp_path):
    """The task a recipe with ``task: ranking`` gets: data, batches, models, metrics, latency input."""
    from types import SimpleNamespace

    from distill.tasks.base import get_task

    inter = _synthetic()
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = []
    for u in range(inter.num_users):  # back to u.data rows: training history, then the test item last
        items = inter.train_items[inter.train_users == u].tolist() + [int(inter.test_items[u])]
        lines += [f"{u + 1}\t{i + 1}\t5\t{t}" for t, i in enumerate(items)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    recipe = SimpleNamespace(data=SimpleNamespace(
        name="ml-100k", options={"path": str(folder), "verify": False, "negatives": 3, "eval_negatives": 10}))
    task = get_task("ranking")
    assert task.primary_metric == "ndcg10" and task.feed is R.feed and not task.supports_cache
    prepared = task.prepare(recipe, tmp_path)
    assert torch.equal(prepared.interactions.test_items, inter.test_items)
    assert prepared.negatives.shape == (60, 10) and prepared.val_loader is None and len(prepared.train) == inter.num_train
    assert "60 users, 40 items" in task.describe(prepared)
    batch = next(iter(task.train_loader(recipe, prepared, 16, seed=0)))
    assert batch["items"].shape == (16, 4)
    spec = SimpleNamespace(model="mf", kwargs={"dim": 4}, weights=None)
    student, teacher = task.build_model(spec, prepared, 0), task.build_model(spec, prepared, 1)
    task.check_models(teacher, student, prepared)
    with pytest.raises(DistillError, match="the teacher scores 3 users"):
        task.check_models(create_ranker("mf", 3, 40), student, prepared)
    metrics = task.evaluate(student, prepared, task.reference(teacher, prepared))
    assert {"hr10", "ndcg10", "hr10_full", "ndcg10_full", "top10_overlap"} <= set(metrics)
    assert task.evaluate(teacher, prepared, task.reference(teacher, prepared))["top10_overlap"] == 1.0
    assert student(task.latency_input(prepared)).shape == (1, 40)
    out = Distiller(student, teacher, [Term("hard", "ce"), Term("soft", "listnet_kd")], feed=task.feed)(batch)
    assert torch.isfinite(out.loss) and set(out.terms) == {"hard", "soft"}
    not_ranking = SimpleNamespace(data=SimpleNamespace(name="digits", options={}))
    with pytest.raises(DistillError, match="no user-item interactions"):
        task.prepare(not_ranking, tmp_path)


def test_ranking_options_are_task_options_typed_and_still_read_from_data_options():
    """The task's settings are typed task_options (issue 14); recipes that gave them in data.options
    keep working, and giving one in both places is refused in one line."""
    from distill.recipes import load_recipe
    from distill.tasks.base import get_task

    task = get_task("ranking")
    recipe = load_recipe("ml-100k")
    assert task.options(recipe) == R.RankingOptions(negatives=20)
    legacy = load_recipe("ml-100k", ["task_options={}", "data.options.negatives=7", "data.options.eval_seed=3"])
    assert (task.options(legacy).negatives, task.options(legacy).eval_seed) == (7, 3)
    with pytest.raises(DistillError, match="negatives given in both data.options and task_options"):
        load_recipe("ml-100k", ["data.options.negatives=7"])
    with pytest.raises(DistillError, match="task_options.negatives: input should be greater than or equal to 1"):
        load_recipe("ml-100k", ["task_options.negatives=0"])
    with pytest.raises(DistillError, match="ranking has no option negative; accepted: negatives, eval_negatives"):
        load_recipe("ml-100k", ["task_options.negative=3"])
