"""The teacher cache and replayed views: a cache round-trips, refuses what it was not made for,
and replays exactly the inputs the teacher saw."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import Distiller, DistillError, LiveTeacher, TeacherSignal, Term
from distill.cache import TeacherCache, build_cache, fingerprint
from distill.data import ArrayDataset, BatchLoader
from distill.losses import kd_loss

TAPS = ["conv", "fc:input"]


class Net(nn.Module):
    """A tiny image classifier with two tap points."""

    def __init__(self, classes: int = 10, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _images(n: int, seed: int = 0, classes: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def _loader(ds: ArrayDataset, batch_size: int = 16, **kw) -> BatchLoader:
    kw.setdefault("shuffle", False)
    return BatchLoader(ds, batch_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw)


AUG = {"crop_padding": 2, "flip": True}


# ------------------------------------------------------------------------------ round trip
def test_dense_fp32_round_trip_equals_live_teacher(tmp_path):
    teacher, loader = Net(), _loader(_images(40))
    path = build_cache(teacher, loader, tmp_path / "cache", taps=TAPS, dtype="fp32")
    cache = TeacherCache(path, expect_fingerprint=fingerprint(teacher, loader))
    assert isinstance(cache, TeacherSignal) and cache.views == 1 and cache.classes == 10
    live = LiveTeacher(teacher)
    for batch in loader:
        got, want = cache.outputs(batch, TAPS), live.outputs(batch, TAPS)
        assert set(got) == {"logits", *TAPS}
        for key in want:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key
    cache.validate_taps(TAPS + ["logits"])
    with pytest.raises(DistillError, match="cached taps: conv, fc:input"):
        cache.validate_taps(["pool"])


def test_fp16_round_trip_within_1e3_relative(tmp_path):
    teacher, loader = Net(), _loader(_images(40))
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "cache", taps=["conv"]))
    assert json.loads((tmp_path / "cache" / "header.json").read_text())["dtype"] == "fp16"
    live = LiveTeacher(teacher)
    for batch in loader:
        got, want = cache.outputs(batch, ["conv"]), live.outputs(batch, ["conv"])
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-6)


def test_build_reports_progress_and_refuses_fp16_overflow(tmp_path):
    teacher, loader = Net(scale=1e6), _loader(_images(20), views=2)
    seen = []
    with pytest.raises(DistillError, match="dtype='fp32'"):
        build_cache(teacher, loader, tmp_path / "big")
    assert not (tmp_path / "big").exists() and not list(tmp_path.iterdir())  # nothing left behind
    build_cache(teacher, loader, tmp_path / "big", dtype="fp32", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (40, 40) and len(seen) == 4


# ------------------------------------------------------------------------------ top-k
def test_topk_rebuilds_a_valid_distribution_close_to_the_teacher(tmp_path):
    classes, k = 50, 8
    teacher, loader = Net(classes, scale=60.0), _loader(_images(64, classes=classes), batch_size=32)
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "c", topk=k, dtype="fp32"))
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["header.json", "tail.npy", "topk_indices.npy", "topk_values.npy"]
    assert np.load(tmp_path / "c" / "topk_indices.npy").dtype == np.int16
    live = LiveTeacher(teacher)
    student = torch.randn(32, classes)
    for batch in loader:
        full = live.outputs(batch)["logits"]
        rebuilt = cache.outputs(batch)["logits"]
        p, q = full.double().softmax(-1), rebuilt.double().softmax(-1)
        top_p, top_i = p.topk(k, dim=-1)
        tail = 1 - top_p.sum(-1)
        assert float(tail.mean()) < 0.05, "the test teacher must be peaked for the KD comparison"
        torch.testing.assert_close(q.sum(-1), torch.ones(32, dtype=torch.float64))
        torch.testing.assert_close(q.gather(-1, top_i), top_p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(1 - q.gather(-1, top_i).sum(-1), tail, rtol=1e-4, atol=1e-6)
        # the tail is spread evenly over the classes outside the top k
        others = q.scatter(-1, top_i, float("nan"))
        spread = others.nan_to_num(0).sum(-1) / (classes - k)
        assert torch.allclose(others.nan_to_num(0) + torch.zeros_like(q).scatter(-1, top_i, 1) * spread[:, None],
                              spread[:, None].expand_as(q), rtol=1e-4, atol=1e-7)
        exact, approx = kd_loss(student, full, temperature=1.0), kd_loss(student, rebuilt, temperature=1.0)
        assert abs(float(approx) - float(exact)) < 0.05 * float(exact)


def test_topk_fp16_and_k_equal_to_classes(tmp_path):
    teacher, loader = Net(5), _loader(_images(20, classes=5))
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "c", topk=5))
    batch = next(iter(loader))
    torch.testing.assert_close(
        cache.outputs(batch)["logits"].softmax(-1), LiveTeacher(teacher).outputs(batch)["logits"].softmax(-1),
        rtol=2e-3, atol=1e-4,
    )
    with pytest.raises(DistillError, match="topk=6 exceeds the teacher's 5 classes"):
        build_cache(teacher, loader, tmp_path / "d", topk=6)


# ------------------------------------------------------------------------------ refusals
def test_fingerprint_refuses_other_teacher_data_or_transforms(tmp_path):
    ds = _images(30)
    teacher, loader = Net(), _loader(ds, augment=AUG, views=2, seed=1)
    path = build_cache(teacher, loader, tmp_path / "c", fingerprint_extra={"feed": "input"})
    stamp = fingerprint(teacher, loader, extra={"feed": "input"})
    assert TeacherCache(path, expect_fingerprint=stamp).fingerprint == stamp
    # another seed does not matter without augmentation, and does with it
    plain = _loader(ds, views=1)
    build_cache(teacher, plain, tmp_path / "plain")
    TeacherCache(tmp_path / "plain", expect_fingerprint=fingerprint(teacher, _loader(ds, views=1, seed=9)))

    cases = [
        (fingerprint(Net(seed=1), loader, extra={"feed": "input"}), "teacher weights"),
        (fingerprint(teacher, _loader(_images(30, seed=5), augment=AUG, views=2, seed=1), extra={"feed": "input"}), "data"),
        (fingerprint(teacher, _loader(ds, augment={"crop_padding": 1, "flip": True}, views=2, seed=1),
                     extra={"feed": "input"}), r"transforms differ .*\(transforms: crop_padding 2 -> 1\)"),
        (fingerprint(teacher, _loader(ds, augment=AUG, views=2, seed=2), extra={"feed": "input"}), "transforms"),
        (fingerprint(teacher, loader, extra={"feed": "other"}), "extra settings"),
    ]
    for expected, part in cases:
        with pytest.raises(DistillError, match=f"made for something else: its {part}.*rebuild it with `distill cache`"):
            TeacherCache(path, expect_fingerprint=expected)


def test_fresh_augmentation_cannot_be_cached(tmp_path):
    with pytest.raises(DistillError, match="views=K"):
        build_cache(Net(), _loader(_images(10), augment=AUG), tmp_path / "c")
    with pytest.raises(DistillError, match="replays 3 views"):
        build_cache(Net(), _loader(_images(10), augment=AUG, views=3), tmp_path / "c", views=2)
    assert not (tmp_path / "c").exists()


def test_corrupt_or_truncated_files_are_refused(tmp_path):
    path = build_cache(Net(), _loader(_images(20)), tmp_path / "c", taps=["conv"])
    logits = path / "logits.npy"
    raw = bytearray(logits.read_bytes())
    raw[-3] ^= 0x10
    logits.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match=r"logits.npy is corrupt or truncated.*distill cache"):
        TeacherCache(path)
    TeacherCache(path, verify=False)  # the caller's choice to skip the full read
    logits.write_bytes(bytes(raw[:-40]))
    with pytest.raises(DistillError, match="logits.npy is corrupt or truncated"):
        TeacherCache(path)
    with pytest.raises(DistillError, match="logits.npy cannot be read"):
        TeacherCache(path, verify=False)
    logits.write_bytes(bytes(raw))
    (path / "tap_0.npy").unlink()
    with pytest.raises(DistillError, match="tap_0.npy is missing"):
        TeacherCache(path, verify=False)
    (path / "header.json").write_text("{not json")
    with pytest.raises(DistillError, match="header.json of teacher cache .* is unreadable"):
        TeacherCache(path)


def test_half_built_cache_is_not_a_cache(tmp_path):
    teacher, loader = Net(), _loader(_images(20))
    path = tmp_path / "c"
    half = tmp_path / "c.tmp-1a2b"
    half.mkdir()
    (half / ".logits.npy.part").write_bytes(b"\x93NUMPY")
    with pytest.raises(DistillError, match="does not exist .*c.tmp-1a2b, an interrupted build"):
        TeacherCache(path)
    with pytest.raises(DistillError, match="unfinished teacher cache"):
        TeacherCache(half)
    # an interrupted build leaves the old cache intact and no temporary directory
    build_cache(teacher, loader, path)
    before = json.loads((path / "header.json").read_text())

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(Net(seed=3), loader, path, progress=interrupt)
    assert json.loads((path / "header.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "c.tmp-1a2b"]
    # a finished rebuild replaces it
    build_cache(Net(seed=3), loader, path)
    assert json.loads((path / "header.json").read_text())["fingerprint"] != before["fingerprint"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(DistillError, match="exists and is not a teacher cache"):
        build_cache(teacher, loader, other)
    with pytest.raises(DistillError, match="not a teacher cache .*no header.json"):
        TeacherCache(other)


# ------------------------------------------------------------------------------ replayed views
def _by_sample_view(loader: BatchLoader, epochs) -> tuple[dict, list]:
    seen, views_per_epoch = {}, []
    for epoch in epochs:
        loader.set_epoch(epoch)
        assignment = {}
        for batch in loader:
            assert torch.equal(batch["input"], loader.view_inputs(batch["index"], batch["view"]))
            for i, v, x in zip(batch["index"].tolist(), batch["view"].tolist(), batch["input"]):
                assignment[i] = v
                if (i, v) in seen:
                    assert torch.equal(seen[(i, v)], x), (epoch, i, v)
                seen[(i, v)] = x.clone()
        views_per_epoch.append(assignment)
    return seen, views_per_epoch


def test_replayed_views_are_the_inputs_the_teacher_saw(tmp_path):
    ds = _images(40)
    loader = _loader(ds, 8, shuffle=True, seed=4, augment=AUG, views=3)
    seen, assigned = _by_sample_view(loader, range(6))
    assert len(seen) > 80  # most (i, v) pairs came up, and each always as the same input
    assert all(set(a) == set(range(40)) for a in assigned)
    assert assigned[0] != assigned[1]  # the view of a sample changes between epochs
    views = {v for a in assigned for v in a.values()}
    assert views == {0, 1, 2}
    assert not torch.equal(loader.view_inputs(torch.arange(40), 0), loader.view_inputs(torch.arange(40), 1))

    teacher = Net()
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "c", taps=["conv"], dtype="fp32"))
    assert cache.views == 3
    live = LiveTeacher(teacher)
    loader.set_epoch(7)
    for batch in loader:
        got, want = cache.outputs(batch, ["conv"]), live.outputs(batch, ["conv"])
        for key in want:  # batched differently when built, so equal up to float summation order
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    with pytest.raises(DistillError, match="no 'view'; build the BatchLoader with views=3"):
        cache.outputs({"input": batch["input"], "index": batch["index"]})
    with pytest.raises(DistillError, match="view 5"):
        cache.outputs({**batch, "view": torch.full_like(batch["view"], 5)})


@pytest.mark.parametrize("world_size", [2, 4])
def test_replayed_views_ranks_together_equal_one_process(world_size):
    ds = _images(37)
    single = _loader(ds, 8, shuffle=True, seed=2, augment=AUG, views=4)
    single.set_epoch(3)
    ranks = []
    for r in range(world_size):
        loader = _loader(ds, 8, shuffle=True, seed=2, augment=AUG, views=4, rank=r, world_size=world_size)
        loader.set_epoch(3)
        ranks.append([dict(b) for b in loader])
    for k, whole in enumerate(single):
        for key in ("input", "target", "index", "view"):
            merged = torch.empty_like(whole[key])
            for r in range(world_size):
                merged[r::world_size] = ranks[r][k][key]
            assert torch.equal(merged, whole[key]), (k, key)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**40), views=st.integers(1, 5), picks=st.lists(st.integers(0, 29), min_size=1, max_size=12))
def test_a_view_does_not_depend_on_its_batch(seed, views, picks):
    loader = _loader(_images(30), augment=AUG, views=views, seed=seed)
    index = torch.tensor(picks)
    view = torch.tensor([(i * 7 + seed) % views for i in picks])
    together = loader.view_inputs(index, view)
    for j in range(len(picks)):
        assert torch.equal(together[j], loader.view_inputs(index[j:j + 1], view[j:j + 1])[0])


def test_views_none_keeps_fresh_augmentation():
    ds = _images(20)
    batch = next(iter(_loader(ds, 20, augment=AUG, seed=1)))
    assert "view" not in batch
    with pytest.raises(DistillError, match="positive integer"):
        _loader(ds, views=0)


# ------------------------------------------------------------------------------ in training
def test_distiller_trains_on_a_cache_as_on_the_live_teacher(tmp_path):
    ds = _images(48)
    teacher, loader = Net(seed=1), _loader(ds, 16, augment=AUG, views=2, seed=5)
    cache = TeacherCache(build_cache(teacher, loader, tmp_path / "c", taps=["conv"], dtype="fp32"))
    terms = [
        Term("soft", "kd", weight=0.9, params={"temperature": 2.0}),
        Term("hard", "ce", weight=0.1),
        Term("hint", "hint", student="conv", teacher="conv", weight=0.5),
    ]
    student = Net(seed=2)
    on_cache = Distiller(student, cache, terms)
    on_live = Distiller(student, teacher, terms)
    batch = next(iter(loader))
    on_cache.dry_run(batch)
    on_live.adapters = on_cache.adapters  # the same adapter, so the losses are comparable
    on_live._built = True
    a, b = on_cache(batch), on_live(batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    for name in a.terms:
        torch.testing.assert_close(a.terms[name], b.terms[name], rtol=1e-6, atol=1e-7)
    # (input, target, index) tuples carry the index too, on a one-view cache
    one_view = TeacherCache(build_cache(teacher, _loader(ds, 16), tmp_path / "one", dtype="fp32"))
    plain = next(iter(_loader(ds, 16)))
    tuple_loss = Distiller(student, one_view, terms[:2])((plain["input"], plain["target"], plain["index"])).loss
    torch.testing.assert_close(tuple_loss, Distiller(student, teacher, terms[:2])(plain).loss)

    optimizer = torch.optim.SGD(on_cache.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        out = on_cache(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_missing_index_or_unknown_sample_is_a_clear_error(tmp_path):
    loader = _loader(_images(20))
    cache = TeacherCache(build_cache(Net(), loader, tmp_path / "c"))
    batch = next(iter(loader))
    with pytest.raises(DistillError, match=r"batch\['index'\], but the batch has none"):
        cache.outputs({"input": batch["input"], "target": batch["target"]})
    with pytest.raises(DistillError, match="index"):
        Distiller(Net(), cache, [Term("soft", "kd")])((batch["input"], batch["target"]))
    with pytest.raises(DistillError, match="sample index 25 is outside .* holds 20 samples"):
        cache.outputs({**batch, "index": batch["index"] + 10})
