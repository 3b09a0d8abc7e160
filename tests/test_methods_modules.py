"""Loss modules with trainable parts or state: VID, FSP, ReviewKD, CRD.

Values are checked against formulations written here from the papers' equations (explicit loops,
manual pooling and batch norm), with the modules' own weights copied in. Properties every loss
must have (finite, gradients to the student and to the module's parameters, bf16, batch order) are
checked for every registered loss in test_loss_contract.py; the end-to-end tests here check what
the objective does with a module loss (builds it, trains its parameters, restores its state after
a dry run).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import Distiller, Term
from distill.errors import DistillError
from distill.losses import CRDLoss, FSPLoss, ReviewKDLoss, VIDLoss, get_loss
from distill.losses.reviewkd import hcl_loss


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def shapes(xs):
    return [tuple(x.shape) for x in xs]


def block_mean(x, size):
    """Average pooling of [B, C, H, W] to size x size by explicit block means (H divisible)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# -- VID ---------------------------------------------------------------------------------------
def test_vid_conv_matches_gaussian_nll_per_element():
    torch.manual_seed(0)
    s, t = randn(3, 4, 8, 8, seed=1), randn(3, 5, 4, 4, seed=2)
    m = VIDLoss(tuple(s.shape), tuple(t.shape), mid_channels=6)
    with torch.no_grad():
        m.alpha.copy_(randn(5, seed=3))  # distinct per-channel variances
    loss = m(s, t)

    w1, w2, w3 = (m.regressor[i].weight.detach()[:, :, 0, 0] for i in (0, 2, 4))
    var = torch.log1p(torch.exp(m.alpha.detach())) + 1e-5
    pooled = block_mean(s, 4)  # the larger (student) map is pooled to the teacher's 4x4
    total, count = 0.0, 0
    for b in range(3):
        for y in range(4):
            for x in range(4):
                mu = w3 @ torch.relu(w2 @ torch.relu(w1 @ pooled[b, :, y, x]))
                log_q = torch.distributions.Normal(mu, var.sqrt()).log_prob(t[b, :, y, x])
                total += float((-log_q - 0.5 * math.log(2 * math.pi)).sum())
                count += 5
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_vid_vectors_match_gaussian_nll():
    s, t = randn(6, 7, seed=1), randn(6, 3, seed=2)
    m = VIDLoss((6, 7), (6, 3), init_pred_var=2.0)
    assert isinstance(m.regressor[0], nn.Linear) and m.regressor[0].out_features == 3  # mid = teacher width
    with torch.no_grad():
        m.alpha.add_(randn(3, seed=3))
    w1, w2, w3 = (m.regressor[i].weight.detach() for i in (0, 2, 4))
    var = torch.log1p(torch.exp(m.alpha.detach())) + 1e-5
    expected = 0.0
    for b in range(6):
        mu = w3 @ torch.relu(w2 @ torch.relu(w1 @ s[b]))
        for c in range(3):
            expected += 0.5 * (math.log(var[c]) + float(t[b, c] - mu[c]) ** 2 / float(var[c]))
    assert m(s, t).item() == pytest.approx(expected / 18, rel=1e-5)


def test_vid_initial_variance_is_init_pred_var():
    assert torch.allclose(VIDLoss((2, 3, 4, 4), (2, 5, 4, 4)).variance(), torch.full((5,), 5.0))
    assert torch.allclose(VIDLoss((2, 3), (2, 5), init_pred_var=0.3).variance(), torch.full((5,), 0.3))


def test_vid_is_not_non_negative_but_bounded_by_the_best_variance():
    s = randn(4, 3, 4, 4, seed=1)
    m = VIDLoss((4, 3, 4, 4), (4, 5, 4, 4))
    with torch.no_grad():
        m.alpha.fill_(math.log(math.expm1(0.5 - 1e-5)))  # sigma^2 = 0.5
        exact = m.regressor(s)
    # a perfect prediction leaves only 0.5 * log sigma^2, negative for sigma^2 < 1
    assert m(s, exact).item() == pytest.approx(0.5 * math.log(0.5), rel=1e-5)
    # for any inputs and variances: per channel, 0.5 (log v + mse / v) >= 0.5 (log mse + 1)
    t = randn(4, 5, 4, 4, seed=2)
    with torch.no_grad():
        m.alpha.copy_(randn(5, seed=3))
        mse = ((t - m.regressor(s)) ** 2).mean(dim=(0, 2, 3))
    assert m(s, t).item() >= float((0.5 * (torch.log(mse) + 1)).mean()) - 1e-6


def test_vid_errors():
    with pytest.raises(ValueError, match="rank"):
        VIDLoss((2, 3, 4, 4), (2, 5))
    with pytest.raises(ValueError, match="single tap"):
        VIDLoss([(2, 3, 4, 4)], (2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, D\] vectors or \[B, C, H, W\]"):
        VIDLoss((2, 3, 4), (2, 3, 4))
    m = VIDLoss((2, 3, 4, 4), (2, 5, 4, 4))
    with pytest.raises(ValueError, match="5 channels"):
        m(randn(2, 3, 4, 4), randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        m(randn(2, 3, 4, 4), randn(3, 5, 4, 4))


# -- FSP ---------------------------------------------------------------------------------------
def fsp_reference(f1, f2):
    """Eq. 1 of Yim et al. for one sample: G[i, j] = sum_hw F1[i] F2[j] / (h w)."""
    h, w = f1.shape[1:]
    g = torch.zeros(f1.shape[0], f2.shape[0])
    for i in range(f1.shape[0]):
        for j in range(f2.shape[0]):
            g[i, j] = (f1[i] * f2[j]).sum() / (h * w)
    return g


def test_fsp_matches_paper_equations_with_adapters_and_pooling():
    b = 3
    # pairs (a1, b1), (a2, b2); a2 is 8x8 against b2's 4x4; channels 3->5 and 3->6 need adapters
    student = [randn(b, c, h, h, seed=i) for i, (c, h) in enumerate([(3, 4), (4, 4), (2, 8), (3, 4)])]
    teacher = [randn(b, c, h, h, seed=9 + i) for i, (c, h) in enumerate([(5, 4), (4, 4), (2, 8), (6, 4)])]
    m = FSPLoss(shapes(student), shapes(teacher))
    assert isinstance(m.adapters[1], nn.Identity) and isinstance(m.adapters[2], nn.Identity)
    loss = m(student, teacher)

    def adapt(i, x):  # 1x1 convolution by hand
        if isinstance(m.adapters[i], nn.Identity):
            return x
        return torch.tensordot(m.adapters[i].weight.detach()[:, :, 0, 0], x, dims=([1], [0]))

    pair_losses = []
    for p in (0, 2):
        total = 0.0
        for n in range(b):
            a_s, b_s = adapt(p, student[p][n]), adapt(p + 1, student[p + 1][n])
            a_t, b_t = teacher[p][n], teacher[p + 1][n]
            if a_s.shape[-1] != b_s.shape[-1]:  # the 8x8 map of pair 2 is pooled to 4x4
                a_s, a_t = block_mean(a_s[None], 4)[0], block_mean(a_t[None], 4)[0]
            total += float(((fsp_reference(a_s, b_s) - fsp_reference(a_t, b_t)) ** 2).sum())
        pair_losses.append(total / b)
    assert loss.item() == pytest.approx(sum(pair_losses) / 2, rel=1e-5)


def test_fsp_zero_when_student_equals_teacher():
    maps = [randn(2, 3, 4, 4, seed=1), randn(2, 5, 4, 4, seed=2)]
    m = FSPLoss(shapes(maps), shapes(maps))
    assert not list(m.parameters())  # identity adapters
    assert m(maps, [x.clone() for x in maps]).item() == 0.0
    assert m([maps[0] + 0.1, maps[1]], maps).item() > 0


def test_fsp_errors():
    four = [(2, 3, 4, 4)] * 4
    with pytest.raises(ValueError, match="even"):
        FSPLoss([(2, 3, 4, 4)] * 3, [(2, 3, 4, 4)] * 3)
    with pytest.raises(ValueError, match="same number of pairs"):
        FSPLoss(four, four[:2])
    with pytest.raises(ValueError, match="pairs of layers"):
        FSPLoss((2, 3, 4, 4), (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        FSPLoss([(2, 3), (2, 3)], [(2, 3), (2, 3)])
    m = FSPLoss(four, four)
    with pytest.raises(ValueError, match="list of 4"):
        m([randn(2, 3, 4, 4)] * 2, [randn(2, 3, 4, 4)] * 4)


# -- ReviewKD ----------------------------------------------------------------------------------
def bn_train(x, bn):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def conv1x1(x, weight, bias=None):
    out = torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv3x3(x, weight):
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return sum(
        torch.einsum("oc,bchw->bohw", weight[:, :, dy, dx], padded[:, :, dy : dy + h, dx : dx + w])
        for dy in range(3) for dx in range(3)
    )


def hcl_reference(s, t):
    h = s.shape[-1]
    terms = [(1.0, ((s - t) ** 2).mean())]
    weight = 1.0
    for level in (4, 2, 1):
        if level < h:
            weight /= 2
            terms.append((weight, ((block_mean(s, level) - block_mean(t, level)) ** 2).mean()))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


def test_reviewkd_matches_residual_fusion_and_hcl_by_hand():
    b = 4
    student = [randn(b, 3, 8, 8, seed=1), randn(b, 4, 4, 4, seed=2), randn(b, 5, 2, 2, seed=3)]
    teacher = [randn(b, 6, 8, 8, seed=4), randn(b, 7, 4, 4, seed=5), randn(b, 8, 2, 2, seed=6)]
    m = ReviewKDLoss(shapes(student), shapes(teacher), mid_channels=4)
    with torch.no_grad():  # non-trivial batch-norm affine parameters
        for i, p in enumerate(q for q in m.parameters() if q.dim() == 1 and q.shape[0] != 2):
            p.copy_(randn(p.shape[0], seed=10 + i) * 0.5 + (1.0 if i % 2 == 0 else 0.0))
    assert m.fusions[2].attention is None and m.fusions[0].attention is not None
    loss = m(student, teacher)

    m.requires_grad_(False)
    expected, residual = 0.0, None
    for i in (2, 1, 0):  # deep to shallow
        f = m.fusions[i]
        x = bn_train(conv1x1(student[i], f.reduce[0].weight), f.reduce[1])
        if residual is not None:  # nearest upsampling by 2, attention over [x, residual]
            r = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            a = torch.sigmoid(conv1x1(torch.cat([x, r], 1), f.attention.weight, f.attention.bias))
            x = x * a[:, :1] + r * a[:, 1:]
        out = bn_train(conv3x3(x, f.expand[0].weight), f.expand[1])
        residual = x
        expected = expected + hcl_reference(out, teacher[i])
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_hcl_zero_for_equal_maps_and_positive_otherwise():
    x = randn(2, 3, 8, 8, seed=1)
    assert hcl_loss(x, x.clone()).item() == 0.0
    assert hcl_loss(x, x + 0.01).item() == pytest.approx(1e-4, rel=1e-4)  # a constant shift at every level
    assert hcl_loss(x, randn(2, 3, 8, 8, seed=2)).item() > 0


def test_reviewkd_is_positive_even_when_student_equals_teacher():
    # the fusion blocks transform the student's features, so equal features do not give zero
    maps = [randn(2, 3, 8, 8, seed=1), randn(2, 5, 4, 4, seed=2)]
    loss = ReviewKDLoss(shapes(maps), shapes(maps), mid_channels=4)(maps, maps)
    assert loss.item() > 0


def test_reviewkd_errors():
    with pytest.raises(ValueError, match="same number of stages"):
        ReviewKDLoss([(2, 3, 4, 4)] * 2, [(2, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ReviewKDLoss([(2, 3)], [(2, 3)])
    with pytest.raises(ValueError, match="several stages"):
        ReviewKDLoss((2, 3, 4, 4), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="mid_channels"):
        ReviewKDLoss([(2, 3, 4, 4)], [(2, 3, 4, 4)], mid_channels=0)
    m = ReviewKDLoss([(2, 3, 4, 4)], [(2, 5, 4, 4)])
    with pytest.raises(ValueError, match=r"expected \[B, 5, H, W\]"):
        m([randn(2, 3, 4, 4)], [randn(2, 4, 4, 4)])


# -- CRD ---------------------------------------------------------------------------------------
def embed_reference(linear, x):
    e = x.flatten(1) @ linear.weight.detach().T + linear.bias.detach()
    return e / e.norm(dim=1, keepdim=True)


def nce_side_reference(anchor, memory, rows, n, z=None):
    """The CRD code's NCE loss for one anchor side, by explicit loops; returns (loss, Z)."""
    b, k1 = rows.shape
    k = k1 - 1
    scores = [[math.exp(float(memory[rows[i, j]] @ anchor[i]) / 0.07) for j in range(k1)] for i in range(b)]
    if z is None:
        z = sum(map(sum, scores)) / (b * k1) * n
    pn = k / n
    loss = 0.0
    for i in range(b):
        p = scores[i][0] / z
        loss -= math.log(p / (p + pn))
        for j in range(1, k1):
            p = scores[i][j] / z
            loss -= math.log(pn / (p + pn))
    return loss / b, z


def test_crd_matches_nce_by_hand_and_keeps_z_from_the_first_batch():
    n, b = 12, 4
    m = CRDLoss((b, 5), (b, 2, 2, 2), feat_dim=6, nce_k=5, num_samples=n)
    s, t = randn(b, 5, seed=1), randn(b, 2, 2, 2, seed=2)
    index = torch.tensor([3, 0, 11, 7])
    negatives = m.sample_negatives(index)
    rows = torch.cat([index[:, None], negatives], 1)
    mem_s, mem_t = m.memory_student.clone(), m.memory_teacher.clone()
    v_s, v_t = embed_reference(m.embed_student, s), embed_reference(m.embed_teacher, t)

    loss = m.contrast(s, t, index, negatives)
    ls, z_s = nce_side_reference(v_s, mem_t, rows, n)
    lt, z_t = nce_side_reference(v_t, mem_s, rows, n)
    assert loss.item() == pytest.approx(ls + lt, rel=1e-4)
    assert torch.exp(m.log_z).tolist() == pytest.approx([z_s, z_t], rel=1e-4)

    # a second batch: Z stays, the banks have moved
    s2, t2 = randn(b, 5, seed=3), randn(b, 2, 2, 2, seed=4)
    mem_s, mem_t = m.memory_student.clone(), m.memory_teacher.clone()
    loss2 = m.contrast(s2, t2, index, negatives)
    ls, _ = nce_side_reference(embed_reference(m.embed_student, s2), mem_t, rows, n, z=z_s)
    lt, _ = nce_side_reference(embed_reference(m.embed_teacher, t2), mem_s, rows, n, z=z_t)
    assert loss2.item() == pytest.approx(ls + lt, rel=1e-4)
    assert torch.exp(m.log_z).tolist() == pytest.approx([z_s, z_t], rel=1e-4)


def test_crd_memory_moves_toward_embeddings_at_batch_indices_only():
    n = 10
    m = CRDLoss((3, 4), (3, 6), feat_dim=8, nce_k=4, momentum=0.7, num_samples=n)
    stdv = 1 / math.sqrt(8 / 3)
    assert m.memory_student.shape == (n, 8) and m.memory_student.abs().max() <= stdv
    assert m.memory_teacher.abs().max() <= stdv and m.memory_teacher.std() > stdv / 3
    s, t, index = randn(3, 4, seed=1), randn(3, 6, seed=2), torch.tensor([2, 9, 5])
    old_s, old_t = m.memory_student.clone(), m.memory_teacher.clone()
    v_s, v_t = embed_reference(m.embed_student, s), embed_reference(m.embed_teacher, t)
    m(s, t, index)
    others = [i for i in range(n) if i not in index.tolist()]
    for bank, old, v in ((m.memory_student, old_s, v_s), (m.memory_teacher, old_t, v_t)):
        assert torch.equal(bank[others], old[others])
        for row, i in enumerate(index.tolist()):
            moved = 0.7 * old[i] + 0.3 * v[row]
            assert torch.allclose(bank[i], moved / moved.norm(), atol=1e-6)
            assert bank[i] @ v[row] > old[i] @ v[row] / old[i].norm()  # closer in angle
    # eval mode: neither the banks nor Z change
    fresh = CRDLoss((3, 4), (3, 6), feat_dim=8, nce_k=4, num_samples=n).eval()
    before = copy.deepcopy(fresh.state_dict())
    fresh(s, t, index)
    after = fresh.state_dict()
    assert torch.equal(after["memory_student"], before["memory_student"])
    assert torch.equal(after["memory_teacher"], before["memory_teacher"])
    assert torch.isnan(after["log_z"]).all()


def test_crd_negatives_are_uniform_over_the_other_samples():
    n = 10
    m = CRDLoss((n, 2), (n, 2), feat_dim=4, num_samples=n)
    assert m.nce_k == n - 1  # 16384 clamped
    index = torch.arange(n)
    draws = torch.cat([m.sample_negatives(index) for _ in range(200)], dim=1)  # [n, 1800]
    assert not (draws == index[:, None]).any()
    for i in range(n):
        counts = torch.bincount(draws[i], minlength=n).float()
        others = torch.cat([counts[:i], counts[i + 1 :]])
        assert counts[i] == 0 and others.min() > 0.75 * 200 and others.max() < 1.25 * 200


def test_crd_errors():
    with pytest.raises(ValueError, match="num_samples"):
        CRDLoss((2, 3), (2, 3))
    with pytest.raises(ValueError, match="one student tap"):
        CRDLoss([(2, 3)], (2, 3), num_samples=5)
    m = CRDLoss((2, 3), (2, 4), num_samples=5)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        m(randn(2, 3), randn(2, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(randn(2, 3), randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="4 values per sample"):
        m(randn(2, 3), randn(2, 5), torch.tensor([0, 1]))


def test_crd_is_invariant_to_permuting_the_batch_with_its_negatives():
    # the contract cannot permute CRD's batch: its negatives are drawn per row; with the same
    # negatives per sample, permuted with it, the loss and the bank update are the same
    torch.manual_seed(0)
    s, t = randn(6, 3, 2, 2, seed=1), randn(6, 7, seed=2)
    m = CRDLoss(tuple(s.shape), tuple(t.shape), feat_dim=8, nce_k=9, num_samples=20)
    index = torch.tensor([4, 0, 19, 7, 8, 13])
    order = torch.tensor([3, 5, 0, 1, 4, 2])
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    negatives = a.sample_negatives(index)
    first = a.contrast(s, t, index, negatives)
    second = b.contrast(s[order], t[order], index[order], negatives[order])
    assert torch.equal(a.memory_student, b.memory_student)
    assert second.item() == pytest.approx(first.item(), rel=1e-5)


METHODS = ["vid", "fsp", "reviewkd", "crd"]


# -- end to end with the Distiller -------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, w1, w2, classes=3):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, w1, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(w1, w1, 3, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w2, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer4(self.layer3(self.layer2(self.layer1(x))))))


N = 32


def cnn_batch():
    g = torch.Generator().manual_seed(1)
    return {
        "input": torch.randn(8, 3, 8, 8, generator=g),
        "target": torch.randint(0, 3, (8,), generator=g),
        "index": torch.randperm(N, generator=g)[:8],
    }


LAYERS = ["layer1", "layer2", "layer3", "layer4"]
TERMS = {
    "vid": Term("vid", "vid", student="layer3", teacher="layer3"),
    "fsp": Term("fsp", "fsp", student=LAYERS, teacher=LAYERS),
    "reviewkd": Term("reviewkd", "reviewkd", student=["layer1", "layer3", "layer4"],
                     teacher=["layer1", "layer3", "layer4"], params={"mid_channels": 8}),
    "crd": Term("crd", "crd", student="fc:input", teacher="fc:input", params={"feat_dim": 16, "nce_k": 15}),
}


@pytest.mark.parametrize("name", METHODS)
def test_distiller_dry_run_and_training_reduce_each_loss(name):
    torch.manual_seed(0)
    d = Distiller(CNN(4, 8), CNN(6, 12), [TERMS[name]], num_samples=N)
    batch = cnn_batch()
    report = d.dry_run(batch)
    assert not report.problems, report.problems
    assert name in report.adapters  # the loss module is described
    module = d.loss_modules[name]
    own = {id(p) for p in module.parameters()}
    assert own and own <= {id(p) for p in d.parameters()}
    if name == "crd":  # the dry run left the banks and Z as they were
        assert torch.isnan(module.log_z).all()

    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    losses = []
    for _ in range(21):
        out = d(batch)
        losses.append(out.terms[name].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def test_crd_needs_num_samples_and_indices():
    with pytest.raises(DistillError, match="num_samples"):
        Distiller(CNN(4, 8), CNN(6, 12), [TERMS["crd"]])
    with pytest.raises(DistillError, match="no parameter 'num_samples'"):
        Term("crd", "crd", student="fc:input", teacher="fc:input", params={"num_samples": 5})
    d = Distiller(CNN(4, 8), CNN(6, 12), [TERMS["crd"]], num_samples=N)
    batch = cnn_batch()
    del batch["index"]
    with pytest.raises(DistillError, match="index"):
        d.dry_run(batch)
    assert get_loss("crd").needs == ("num_samples",)


def test_wrong_taps_become_distill_errors():
    odd = Term("fsp", "fsp", student=LAYERS[:3], teacher=LAYERS[:3])
    with pytest.raises(DistillError, match="even"):
        Distiller(CNN(4, 8), CNN(6, 12), [odd]).dry_run(cnn_batch())
    flat = Term("r", "reviewkd", student=["layer4", "fc:input"], teacher=["layer4", "fc:input"])
    with pytest.raises(DistillError, match=r"\[B, C, H, W\]"):
        Distiller(CNN(4, 8), CNN(6, 12), [flat]).dry_run(cnn_batch())
