"""Each method loss against a formulation written here from the paper's equations: plain loops
over samples, pairs, triplets and channels in float64 (numpy / python), never the implementation.
Conventions the implementation documents as following the authors' code (T² factors, the
reduction, the unbiased standard deviation, PKT's self-similarity) are written out explicitly."""

import itertools
import math

import numpy as np
import pytest
import torch

from distill.losses import (
    at_loss,
    cc_loss,
    dist_loss,
    dkd_loss,
    kd_std_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    tf_kd_loss,
)

REL = 1e-4


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rows(x):
    return x.double().reshape(x.shape[0], -1).numpy()


def softmax(v, T=1.0):
    z = [math.exp((a - max(v)) / T) for a in v]
    return [a / sum(z) for a in z]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# -- logits ------------------------------------------------------------------------------------


def reference_dkd(s, t, y, alpha, beta, T):
    total = 0.0
    for row_s, row_t, c in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax(row_s, T), softmax(row_t, T)
        b_s, b_t = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        hat_s = [p / (1 - ps[c]) for k, p in enumerate(ps) if k != c]
        hat_t = [p / (1 - pt[c]) for k, p in enumerate(pt) if k != c]
        total += alpha * kl(b_t, b_s) + beta * kl(hat_t, hat_s)
    return total / len(s) * T * T


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.0)])
def test_dkd(alpha, beta, T):
    g = gen(0)
    s, t = torch.randn(7, 9, generator=g) * 3, torch.randn(7, 9, generator=g) * 3
    y = torch.randint(0, 9, (7,), generator=g)
    value = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T).item()
    assert value == pytest.approx(reference_dkd(s, t, y, alpha, beta, T), rel=REL)


def test_dkd_sequence_logits_flatten_like_kd():
    g = gen(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y = torch.randint(0, 5, (2, 3), generator=g)
    expected = reference_dkd(s.reshape(6, 5), t.reshape(6, 5), y.reshape(6), 1.0, 8.0, 4.0)
    assert dkd_loss(s, t, y).item() == pytest.approx(expected, rel=REL)


def pearson(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.corrcoef(a, b)[0, 1])


def reference_dist(s, t, beta, gamma, T):
    ys = np.array([softmax(r, T) for r in s.tolist()])
    yt = np.array([softmax(r, T) for r in t.tolist()])
    inter = 1 - np.mean([pearson(ys[i], yt[i]) for i in range(len(ys))])
    intra = 1 - np.mean([pearson(ys[:, k], yt[:, k]) for k in range(ys.shape[1])])
    return T * T * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta, gamma, T", [(1, 1, 1.0), (2, 2, 4.0), (1, 0, 1.0), (0, 1, 2.0)])
def test_dist(beta, gamma, T):
    g = gen(2)
    s, t = torch.randn(8, 6, generator=g) * 3, torch.randn(8, 6, generator=g) * 3
    value = dist_loss(s, t, beta=beta, gamma=gamma, temperature=T).item()
    assert value == pytest.approx(reference_dist(s, t, beta, gamma, T), rel=REL)


def reference_kd_std(s, t, T, eps=1e-7):
    def z(v):
        mean = sum(v) / len(v)
        std = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))  # unbiased, as torch.std
        return [(a - mean) / (std + eps) for a in v]

    total = sum(kl(softmax(z(rt), T), softmax(z(rs), T)) for rs, rt in zip(s.tolist(), t.tolist()))
    return total / len(s) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_kd_std(T):
    g = gen(3)
    s = torch.randn(6, 7, generator=g) * 2 + 1
    t = torch.randn(6, 7, generator=g) * 5 - 2
    assert kd_std_loss(s, t, temperature=T).item() == pytest.approx(reference_kd_std(s, t, T), rel=REL)


def reference_tf_kd(s, y, a, T):
    total = 0.0
    classes = s.shape[1]
    for row, c in zip(s.tolist(), y.tolist()):
        pd = [a if k == c else (1 - a) / (classes - 1) for k in range(classes)]
        soft = [p ** (1 / T) for p in pd]  # a distribution softened at T: p^(1/T), renormalised
        soft = [p / sum(soft) for p in soft]
        total += kl(soft, softmax(row, T))
    return total / len(s) * T * T


@pytest.mark.parametrize("a, T", [(0.99, 20.0), (0.9, 1.0), (0.9, 4.0), (0.5, 2.0)])
def test_tf_kd(a, T):
    g = gen(4)
    s, y = torch.randn(9, 5, generator=g) * 3, torch.randint(0, 5, (9,), generator=g)
    value = tf_kd_loss(s, y, correct_prob=a, temperature=T).item()
    assert value == pytest.approx(reference_tf_kd(s, y, a, T), rel=REL)


# -- feature maps ----------------------------------------------------------------------------


def block_mean(m, size):
    """Average non-overlapping blocks of a [H, W] array down to ``size`` (H, W multiples)."""
    h, w = m.shape
    fh, fw = h // size[0], w // size[1]
    return m.reshape(size[0], fh, size[1], fw).mean(axis=(1, 3))


def reference_at(fs, ft, p):
    fs, ft = fs.double().numpy(), ft.double().numpy()
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    total, count = 0.0, 0
    for b in range(fs.shape[0]):
        maps = []
        for f in (fs[b], ft[b]):
            energy = sum(np.abs(f[c]) ** p for c in range(f.shape[0])) / f.shape[0]
            energy = block_mean(energy, size).reshape(-1)
            maps.append(energy / math.sqrt(sum(v * v for v in energy)))
        total += sum((u - v) ** 2 for u, v in zip(*maps))
        count += len(maps[0])
    return total / count


@pytest.mark.parametrize(
    "s_shape, t_shape, p",
    [((4, 3, 6, 6), (4, 8, 6, 6), 2.0), ((3, 5, 8, 8), (3, 2, 4, 4), 2.0), ((3, 5, 2, 4), (3, 4, 4, 8), 1.0)],
)
def test_at(s_shape, t_shape, p):
    g = gen(5)
    fs, ft = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g)
    assert at_loss(fs, ft, p=p).item() == pytest.approx(reference_at(fs, ft, p), rel=REL)


def reference_nst(fs, ft):
    fs, ft = fs.double().numpy(), ft.double().numpy()
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    total = 0.0
    for b in range(fs.shape[0]):
        sets = []
        for f in (fs[b], ft[b]):
            channels = [block_mean(f[c], size).reshape(-1) for c in range(f.shape[0])]
            # a dead (all-zero) channel has no direction: it stays the zero vector
            sets.append([v / np.linalg.norm(v) if np.any(v) else v for v in channels])
        s_set, t_set = sets

        def k(x, y):
            return float(np.dot(x, y)) ** 2  # polynomial kernel, d = 2, c = 0

        mean_k = lambda xs, ys: sum(k(x, y) for x in xs for y in ys) / (len(xs) * len(ys))  # noqa: E731
        total += mean_k(t_set, t_set) + mean_k(s_set, s_set) - 2 * mean_k(s_set, t_set)
    return total / fs.shape[0]


@pytest.mark.parametrize(
    "s_shape, t_shape",
    [
        ((3, 3, 4, 4), (3, 5, 4, 4)),  # few channels, many positions: channel Gram matrices
        ((3, 12, 2, 2), (3, 10, 2, 2)),  # many channels, few positions: spatial Gram matrices
        ((2, 4, 8, 8), (2, 6, 4, 4)),  # student pooled to the teacher's size
    ],
)
def test_nst(s_shape, t_shape):
    g = gen(6)
    fs, ft = torch.randn(*s_shape, generator=g).relu(), torch.randn(*t_shape, generator=g).relu() + 0.1
    assert nst_loss(fs, ft).item() == pytest.approx(reference_nst(fs, ft), rel=REL)


# -- relations between samples -----------------------------------------------------------------

RELATION_SHAPES = [((6, 5), (6, 9)), ((5, 2, 3), (5, 4)), ((4, 3, 2, 2), (4, 7))]


def reference_sp(fs, ft):
    def g_norm(f):
        gram = [[float(np.dot(a, b)) for b in f] for a in f]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in gram]

    gs, gt = g_norm(rows(fs)), g_norm(rows(ft))
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


@pytest.mark.parametrize("s_shape, t_shape", RELATION_SHAPES)
def test_sp(s_shape, t_shape):
    g = gen(7)
    fs, ft = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g)
    assert sp_loss(fs, ft).item() == pytest.approx(reference_sp(fs, ft), rel=REL)


def reference_rkd(fs, ft, w_d, w_a):
    def potentials(x):
        b = len(x)
        dist = {(i, j): float(np.linalg.norm(x[i] - x[j])) for i in range(b) for j in range(b) if i != j}
        mu = sum(dist.values()) / len(dist)
        psi_d = {pair: d / mu for pair, d in dist.items()}
        psi_a = {}
        for i, j, k in itertools.product(range(b), repeat=3):
            if i == j or k == j:
                continue  # no angle at a vertex that is also an end
            e1 = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
            e2 = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
            psi_a[i, j, k] = float(np.dot(e1, e2))
        return psi_d, psi_a

    (ds, as_), (dt, at) = potentials(rows(fs)), potentials(rows(ft))
    b = fs.shape[0]
    # the authors' code averages over all B^2 pairs and B^3 triplets; degenerate ones add 0
    loss_d = sum(huber(ds[p] - dt[p]) for p in ds) / b**2
    loss_a = sum(huber(as_[p] - at[p]) for p in as_) / b**3
    return w_d * loss_d + w_a * loss_a


@pytest.mark.parametrize("s_shape, t_shape", RELATION_SHAPES)
@pytest.mark.parametrize("w_d, w_a", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd(s_shape, t_shape, w_d, w_a):
    g = gen(8)
    fs, ft = torch.randn(*s_shape, generator=g) * 2, torch.randn(*t_shape, generator=g) * 0.3
    value = rkd_loss(fs, ft, distance_weight=w_d, angle_weight=w_a).item()
    assert value == pytest.approx(reference_rkd(fs, ft, w_d, w_a), rel=REL)


def test_rkd_large_differences_reach_the_linear_part_of_the_huber_loss():
    g = gen(9)
    fs = torch.randn(5, 3, generator=g)
    fs[0] *= 30  # one far-away sample: normalised distances differ by more than 1
    ft = torch.randn(5, 4, generator=g)
    x, y = rows(fs), rows(ft)
    mu_s = np.mean([np.linalg.norm(x[i] - x[j]) for i in range(5) for j in range(5) if i != j])
    mu_t = np.mean([np.linalg.norm(y[i] - y[j]) for i in range(5) for j in range(5) if i != j])
    diffs = [abs(np.linalg.norm(x[0] - x[j]) / mu_s - np.linalg.norm(y[0] - y[j]) / mu_t) for j in range(1, 5)]
    assert max(diffs) > 1  # the case this test is about
    value = rkd_loss(fs, ft, distance_weight=1.0, angle_weight=0.0).item()
    assert value == pytest.approx(reference_rkd(fs, ft, 1.0, 0.0), rel=REL)


def reference_pkt(fs, ft, eps=1e-7):
    def cosine(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    def conditional(x):
        kernel = [[(cosine(a, b) + 1) / 2 for b in x] for a in x]
        return [[v / sum(row) for v in row] for row in kernel]  # p(j | i), self included as in the code

    ps, pt = conditional(rows(fs)), conditional(rows(ft))
    b = len(ps)
    total = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b))
    return total / (b * b)


@pytest.mark.parametrize("s_shape, t_shape", RELATION_SHAPES)
def test_pkt(s_shape, t_shape):
    g = gen(10)
    fs, ft = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g)
    assert pkt_loss(fs, ft).item() == pytest.approx(reference_pkt(fs, ft), rel=REL)


def reference_cc(fs, ft, gamma, order, exact=False):
    def correlation(x):
        x = [v / np.linalg.norm(v) for v in x]
        out = []
        for a in x:
            row = []
            for b in x:
                if exact:  # the Gaussian RBF kernel the Taylor series approximates
                    row.append(math.exp(-gamma * float(np.sum((a - b) ** 2))))
                else:
                    dot = float(np.dot(a, b))
                    terms = [(2 * gamma * dot) ** p / math.factorial(p) for p in range(order + 1)]
                    row.append(math.exp(-2 * gamma) * sum(terms))
            out.append(row)
        return out

    cs, ct = correlation(rows(fs)), correlation(rows(ft))
    b = len(cs)
    return sum((cs[i][j] - ct[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


@pytest.mark.parametrize("s_shape, t_shape", RELATION_SHAPES)
@pytest.mark.parametrize("gamma, order", [(0.4, 2), (1.0, 1), (0.4, 0), (2.0, 5)])
def test_cc(s_shape, t_shape, gamma, order):
    g = gen(11)
    fs, ft = torch.randn(*s_shape, generator=g), torch.randn(*t_shape, generator=g)
    if order == 0:  # a constant kernel: nothing to match
        assert cc_loss(fs, ft, gamma=gamma, order=order).item() == pytest.approx(0.0, abs=1e-12)
        return
    expected = reference_cc(fs, ft, gamma, order)
    assert cc_loss(fs, ft, gamma=gamma, order=order).item() == pytest.approx(expected, rel=REL)


def test_cc_high_order_approaches_the_gaussian_kernel():
    g = gen(12)
    fs, ft = torch.randn(6, 5, generator=g), torch.randn(6, 8, generator=g)
    exact = reference_cc(fs, ft, 0.4, None, exact=True)
    assert cc_loss(fs, ft, gamma=0.4, order=12).item() == pytest.approx(exact, rel=REL)
    assert cc_loss(fs, ft, gamma=0.4, order=1).item() != pytest.approx(exact, rel=1e-2)
