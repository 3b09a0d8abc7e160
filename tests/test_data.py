"""Data sets, readers and the batch loader: behaviour on small data and on the real shared sets."""

import gzip
import io
import random
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from distill.data import (
    DATASETS, ArrayDataset, BatchLoader, load_dataset, mixup_inputs, normalize, random_crop_flip,
    split_validation,
)
from distill.data.cifar import CIFAR10_CLASSES, parse_cifar_records
from distill.data.download import safe_extract_tar
from distill.data.idx import parse_idx, read_idx
from distill.errors import DistillError

def test_all_builders_registered():
    for name in ("mnist", "fashion-mnist", "cifar10", "image-folder", "arrays", "digits", "mnist1d"):
        assert name in DATASETS


def test_unknown_option_lists_accepted(tmp_path):
    with pytest.raises(DistillError, match="accepted options: path, download, mirror"):
        load_dataset("mnist", tmp_path, pth="x")
    with pytest.raises(DistillError, match="needs the option path"):
        load_dataset("arrays", tmp_path)


# ---------------------------------------------------------------------------------- offline sets
def test_digits_stratified_and_seeded(tmp_path):
    a = load_dataset("digits", tmp_path)
    assert a.train.inputs.shape[1:] == (1, 8, 8) and a.train.inputs.dtype == torch.float32
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 360
    assert 0 <= float(a.train.inputs.min()) and float(a.train.inputs.max()) <= 1
    assert a.train.targets.dtype == torch.int64 and a.num_classes == 10 and a.input_shape == (1, 8, 8)
    # stratified: every class keeps about its share in the test split
    share = torch.bincount(a.test.targets, minlength=10).float() / torch.bincount(
        torch.cat([a.train.targets, a.test.targets]), minlength=10
    )
    assert torch.all((share - 0.2).abs() < 0.02)
    b = load_dataset("digits", tmp_path)
    c = load_dataset("digits", tmp_path, seed=1, test_fraction=0.5)
    assert torch.equal(a.test.inputs, b.test.inputs)
    assert len(c.test) in (898, 899, 900) and not torch.equal(a.test.targets, c.test.targets[:360])
    with pytest.raises(DistillError, match="test_fraction"):
        load_dataset("digits", tmp_path, test_fraction=1.5)


def test_mnist1d_generates_caches_and_leaves_global_rng(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = load_dataset("mnist1d", tmp_path, num_samples=200, seed=3)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert a.train.inputs.shape == (160, 40) and a.test.inputs.shape == (40, 40)
    assert a.train.inputs.dtype == torch.float32 and a.input_shape == (40,) and a.mean is None
    assert set(a.train.targets.tolist()) == set(range(10))
    caches = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(caches) == 1
    b = load_dataset("mnist1d", tmp_path, num_samples=200, seed=3)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    c = load_dataset("mnist1d", tmp_path, num_samples=200, seed=4)
    assert not torch.equal(a.train.inputs, c.train.inputs)


# ------------------------------------------------------------------------------ MNIST and IDX
def test_mnist_from_shared_folder(shared, tmp_path):
    d = load_dataset("mnist", tmp_path, path=shared / "mnist")
    assert d.train.inputs.shape == (60000, 1, 28, 28) and d.train.inputs.dtype == torch.uint8
    assert d.test.inputs.shape == (10000, 1, 28, 28) and d.test.targets.dtype == torch.int64
    assert d.test.targets[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert torch.bincount(d.train.targets).tolist()[:2] == [5923, 6742]
    assert abs(float(d.train.inputs.float().mean()) / 255 - 0.1307) < 1e-3
    assert d.mean == (0.1307,) and d.std == (0.3081,) and d.class_names[3] == "3"
    assert not any(tmp_path.iterdir()), "reading from path= writes nothing"


def test_fashion_mnist_from_shared_folder(shared, tmp_path):
    d = load_dataset("fashion-mnist", tmp_path, path=shared / "fashion-mnist")
    assert d.train.inputs.shape == (60000, 1, 28, 28) and len(d.test) == 10000
    assert torch.bincount(d.train.targets).tolist() == [6000] * 10
    assert abs(float(d.train.inputs.float().std()) / 255 - 0.3530) < 1e-3
    assert d.mean == (0.2860,) and d.class_names[9] == "Ankle boot"


def test_mnist_rejects_altered_content_and_missing_files(shared, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shared / "mnist", folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # one flipped label: still a valid IDX file
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DistillError, match="differs from the official"):
        load_dataset("mnist", tmp_path, path=folder)
    labels.unlink()
    with pytest.raises(DistillError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_dataset("mnist", tmp_path, path=folder)
    with pytest.raises(DistillError, match="pass download=True"):
        load_dataset("mnist", tmp_path / "empty", download=False)


def _idx(values: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + values.astype(values.dtype.newbyteorder(">")).tobytes()


def test_idx_round_trip_gzip_and_raw(tmp_path):
    values = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a.idx").write_bytes(_idx(values, 0x0C))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx(values, 0x0C)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.int32 and np.array_equal(out, values)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x02\x08\x01" + b"\x00" * 8, "wrong magic"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated inside its header"),
        (_idx(np.zeros((4, 5), np.uint8))[:-3], "truncated"),
        (_idx(np.zeros((4, 5), np.uint8)) + b"\x00", "longer than its header"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x00", "unknown IDX type"),
    ],
)
def test_idx_corruption_is_a_clear_error(data, message):
    with pytest.raises(DistillError, match=message):
        parse_idx(data, "file.idx")


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_idx(np.zeros((100, 10), np.uint8)))[:-20])
    with pytest.raises(DistillError, match="corrupt or truncated gzip"):
        read_idx(path)


# ----------------------------------------------------------------------- CIFAR-10 and image trees
def _image(rng: np.random.Generator, shape=(32, 32, 3)) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _write_tree(root: Path, classes, per_class=(2, 1), shape=(32, 32, 3), test_dir="test", seed=0):
    """A lossless PNG tree; returns {(split, class, name): HWC pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, count in zip(("train", test_dir), per_class):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = _image(rng, shape)
                Image.fromarray(img.squeeze(-1) if shape[-1] == 1 else img).save(root / split / cls / f"{i:04d}.png")
                pixels[(split, cls, i)] = img
    return pixels


def test_cifar10_from_image_folder_and_tarball(tmp_path):
    tree = tmp_path / "src" / "CIFAR-10-images"
    pixels = _write_tree(tree, CIFAR10_CLASSES)
    d = load_dataset("cifar10", tmp_path / "data", path=tree.parent)
    assert d.train.inputs.shape == (20, 3, 32, 32) and d.test.inputs.shape == (10, 3, 32, 32)
    assert d.train.targets.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(d.train.inputs[3], torch.from_numpy(pixels[("train", "automobile", 1)]).permute(2, 0, 1))
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.class_names == CIFAR10_CLASSES

    archive = tmp_path / "cifar-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="CIFAR-10-images")
    t = load_dataset("cifar10", tmp_path / "data", path=archive)
    assert torch.equal(t.train.inputs, d.train.inputs) and torch.equal(t.test.targets, d.test.targets)
    caches = sorted((tmp_path / "data" / "cifar10").glob("*.npz"))
    assert len(caches) == 2  # one per source
    stamp = [c.stat().st_mtime_ns for c in caches]
    again = load_dataset("cifar10", tmp_path / "data", path=archive)
    assert torch.equal(again.train.inputs, d.train.inputs)
    assert [c.stat().st_mtime_ns for c in caches] == stamp, "the second load reads the cache"


def test_cifar10_rejects_other_trees(tmp_path):
    _write_tree(tmp_path / "tree", ["cats", "dogs"])
    with pytest.raises(DistillError, match="is not CIFAR-10.*image-folder"):
        load_dataset("cifar10", tmp_path / "data", path=tmp_path / "tree")


def test_cifar10_binary_records(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, size=3, dtype=np.uint8)
        images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(3, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        expected[name] = (images, labels)
    d = load_dataset("cifar10", tmp_path / "data", path=tmp_path)
    assert d.train.inputs.shape == (15, 3, 32, 32) and len(d.test) == 3
    images, labels = expected["data_batch_2.bin"]
    assert torch.equal(d.train.inputs[3:6], torch.from_numpy(images))  # red plane first, row-major
    assert d.train.targets[3:6].tolist() == labels.tolist()
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    a = load_dataset("cifar10", tmp_path / "data", path=archive)
    assert torch.equal(a.train.inputs, d.train.inputs) and torch.equal(a.test.targets, d.test.targets)
    with pytest.raises(DistillError, match="not a multiple"):
        parse_cifar_records(b"\x00" * 3000, "x.bin")


def test_cifar10_real_jpeg_tarball(shared, tmp_path):
    archive = shared / "cifar10-jpg" / "cifar10-jpg.tar.gz"
    d = load_dataset("cifar10", tmp_path, path=archive)
    assert d.train.inputs.shape == (50000, 3, 32, 32) and d.test.inputs.shape == (10000, 3, 32, 32)
    assert torch.bincount(d.train.targets).tolist() == [5000] * 10
    assert torch.bincount(d.test.targets).tolist() == [1000] * 10
    means = (d.train.inputs[::10].float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.4913, 0.4821, 0.4465]), atol=3e-3)
    again = load_dataset("cifar10", tmp_path, path=archive)  # from the .npz cache
    assert torch.equal(again.test.inputs, d.test.inputs)
    for cache in (tmp_path / "cifar10").glob("*.npz"):
        cache.unlink()  # 185 MB: do not keep it among pytest's retained temp dirs


def test_image_folder_resize_grey_and_val(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root, ["a", "b", "c"], per_class=(3, 2), shape=(20, 24, 1), test_dir="val")
    Image.fromarray(_image(np.random.default_rng(1), (40, 30, 1)).squeeze(-1)).save(root / "train" / "a" / "big.png")
    with pytest.raises(DistillError, match="pass size"):
        load_dataset("image-folder", tmp_path / "data", path=root)
    d = load_dataset("image-folder", tmp_path / "data", path=root, size=[16, 12])
    assert d.train.inputs.shape == (10, 1, 16, 12) and d.test.inputs.shape == (6, 1, 16, 12)
    assert d.class_names == ["a", "b", "c"] and d.extra["test_split"] == "val" and len(d.mean) == 1
    rgb = load_dataset("image-folder", tmp_path / "data", path=root, size=16, mode="rgb")
    assert rgb.train.inputs.shape == (10, 3, 16, 16)
    # auto mode: one colour image makes every image RGB, grey ones repeated across channels
    Image.fromarray(_image(np.random.default_rng(2), (20, 24, 3))).save(root / "val" / "c" / "colour.png")
    mixed = load_dataset("image-folder", tmp_path / "data", path=root, size=[20, 24])
    assert mixed.train.inputs.shape == (10, 3, 20, 24) and mixed.test.inputs.shape == (7, 3, 20, 24)
    first = mixed.train.inputs[0]
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])


def test_image_folder_errors(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root, ["a", "b"], per_class=(1, 1))
    (root / "test" / "zebra").mkdir()
    Image.fromarray(_image(np.random.default_rng(0))).save(root / "test" / "zebra" / "z.png")
    with pytest.raises(DistillError, match="classes not in train/: zebra"):
        load_dataset("image-folder", tmp_path / "data", path=root)
    shutil.rmtree(root / "test" / "zebra")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DistillError, match="cannot decode image .*broken.jpg"):
        load_dataset("image-folder", tmp_path / "data", path=root)
    shutil.rmtree(root / "test")
    with pytest.raises(DistillError, match="no test/ or val/"):
        load_dataset("image-folder", tmp_path / "data", path=root)


# -------------------------------------------------------------------------------------- arrays
def test_arrays_npz_and_pt_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)  # channels-last
    x_test = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 3, size=12), rng.integers(0, 3, size=4)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(DistillError, match="look channels-last; pass layout: NHWC"):
        load_dataset("arrays", tmp_path, path=tmp_path / "d.npz")
    d = load_dataset("arrays", tmp_path, path=tmp_path / "d.npz", layout="NHWC", num_classes=5)
    assert d.train.inputs.shape == (12, 3, 8, 8) and d.num_classes == 5 and len(d.mean) == 3
    assert torch.equal(d.train.inputs, torch.from_numpy(x_train).permute(0, 3, 1, 2))
    assert d.train.targets.dtype == torch.int64 and d.train.targets.tolist() == y_train.tolist()

    feats = {"x_train": torch.randn(10, 7), "y_train": torch.arange(10) % 4,
             "x_test": torch.randn(3, 7, dtype=torch.float64), "y_test": torch.tensor([0, 1, 3])}
    torch.save(feats, tmp_path / "f.pt")
    p = load_dataset("arrays", tmp_path, path=tmp_path / "f.pt")
    assert p.input_shape == (7,) and p.num_classes == 4 and p.mean is None
    assert p.test.inputs.dtype == torch.float32 and torch.allclose(p.test.inputs, feats["x_test"].float())


def test_arrays_errors(tmp_path):
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[[1.0]], y_test=[0])
    with pytest.raises(DistillError, match="pickle"):
        load_dataset("arrays", tmp_path, path=tmp_path / "obj.npz")
    good = dict(x_train=np.zeros((5, 3), np.float32), y_train=np.arange(5), x_test=np.zeros((2, 3), np.float32),
                y_test=np.array([0, 1]))
    np.savez(tmp_path / "good.npz", **good)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:200])
    with pytest.raises(DistillError, match="not a readable .npz"):
        load_dataset("arrays", tmp_path, path=tmp_path / "cut.npz")
    with pytest.raises(DistillError, match="out of range for num_classes=3"):
        load_dataset("arrays", tmp_path, path=tmp_path / "good.npz", num_classes=3)
    np.savez(tmp_path / "len.npz", **{**good, "y_test": np.array([0, 1, 2])})
    with pytest.raises(DistillError, match="x_test has 2 samples but y_test has 3"):
        load_dataset("arrays", tmp_path, path=tmp_path / "len.npz")
    np.savez(tmp_path / "miss.npz", x_train=good["x_train"])
    with pytest.raises(DistillError, match="lacks y_train, x_test, y_test"):
        load_dataset("arrays", tmp_path, path=tmp_path / "miss.npz")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DistillError, match="expected a dict"):
        load_dataset("arrays", tmp_path, path=tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DistillError, match="weights_only=True"):
        load_dataset("arrays", tmp_path, path=tmp_path / "junk.pt")


# ------------------------------------------------------------------------------- tar extraction
def _tar_with(path: Path, name: str, *, link: str | None = None, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("pkg/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_safe_extract_tar_extracts(tmp_path):
    archive = _tar_with(tmp_path / "a.tar.gz", "pkg/inner.txt", data=b"hello")
    out = safe_extract_tar(archive, tmp_path / "out")
    assert (out / "pkg" / "inner.txt").read_bytes() == b"hello" and (out / "pkg" / "ok.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"], "no temporary folder left"
    link = _tar_with(tmp_path / "l.tar.gz", "pkg/link", link="ok.txt")
    assert (safe_extract_tar(link, tmp_path / "out2") / "pkg" / "link").read_bytes() == b"ok"


@pytest.mark.parametrize(
    "name, link",
    [("../evil", None), ("pkg/../../evil", None), ("/tmp/evil-abs", None), ("pkg/link", "../../evil"),
     ("pkg/link", "/etc/passwd")],
)
def test_safe_extract_tar_refuses_escapes(tmp_path, name, link):
    archive = _tar_with(tmp_path / "bad.tar.gz", name, link=link)
    dest = tmp_path / "box" / "out"
    with pytest.raises(DistillError, match="refusing to extract"):
        safe_extract_tar(archive, dest)
    assert not dest.exists() and list((tmp_path / "box").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()


def test_safe_extract_tar_corrupt(tmp_path):
    archive = _tar_with(tmp_path / "a.tar.gz", "pkg/x.txt", data=bytes(range(256)) * 400)
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DistillError):
        safe_extract_tar(tmp_path / "cut.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ loader
def _images(n=50, classes=5) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def _collect(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def test_loader_batches_cover_the_data_and_scale():
    ds = _images(50)
    loader = BatchLoader(ds, 16, shuffle=False, mean=(0.5,), std=(0.25,))
    batches = _collect(loader)
    assert len(loader) == len(batches) == 4 and [len(b["index"]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(50))
    first = batches[0]
    assert first["input"].dtype == torch.float32 and first["target"].dtype == torch.int64
    assert torch.allclose(first["input"], (ds.inputs[:16].float() / 255 - 0.5) / 0.25)
    assert torch.equal(first["target"], ds.targets[:16])
    assert len(BatchLoader(ds, 16, shuffle=True, drop_last=True)) == 3


def test_loader_determinism_and_epochs():
    ds = _images(50)
    make = lambda: BatchLoader(ds, 10, shuffle=True, seed=3, augment={"crop_padding": 2, "flip": True})  # noqa: E731
    a, b = make(), make()
    a.set_epoch(4)
    b.set_epoch(4)
    for x, y in zip(_collect(a), _collect(b)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    b.set_epoch(5)
    assert not torch.equal(torch.cat([x["index"] for x in _collect(a)]), torch.cat([x["index"] for x in _collect(b)]))
    for batch in _collect(a):  # targets and indices stay paired under shuffling
        assert torch.equal(batch["target"], ds.targets[batch["index"]])
    other_seed = BatchLoader(ds, 10, shuffle=True, seed=4)
    other_seed.set_epoch(4)
    assert not torch.equal(next(iter(other_seed))["index"], next(iter(a))["index"])


@pytest.mark.parametrize("world_size", [2, 5])
def test_ranks_together_equal_one_process(world_size):
    ds = _images(47)
    kwargs = dict(shuffle=True, seed=11, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4),
                  augment={"crop_padding": 3, "flip": True})
    single = BatchLoader(ds, 10, **kwargs)
    single.set_epoch(2)
    ranks = []
    for r in range(world_size):
        loader = BatchLoader(ds, 10, **kwargs)
        loader.rank, loader.world_size = r, world_size  # as the trainer sets them
        loader.set_epoch(2)
        assert len(loader) == len(single)
        ranks.append(_collect(loader))
    for k, whole in enumerate(_collect(single)):
        for key in ("input", "target", "index"):
            merged = torch.empty_like(whole[key])
            for r in range(world_size):
                merged[r::world_size] = ranks[r][k][key]
            assert torch.equal(merged, whole[key]), (k, key)


def test_loader_errors():
    ds = _images(20)
    loader = BatchLoader(ds, 10, shuffle=True, world_size=3)
    with pytest.raises(DistillError, match="not divisible by the 3 processes"):
        next(iter(loader))
    with pytest.raises(DistillError, match="turn the augmentation off"):
        BatchLoader(ArrayDataset(torch.randn(5, 40), torch.zeros(5, dtype=torch.long)), 2, shuffle=False,
                    augment={"flip": True})
    with pytest.raises(DistillError, match="unknown augmentation rotate"):
        BatchLoader(ds, 4, shuffle=False, augment={"rotate": 3})
    with pytest.raises(DistillError, match="3 channels"):
        BatchLoader(ds, 4, shuffle=False, mean=(0.1, 0.2), std=(1.0, 1.0))


# ----------------------------------------------------------------------------------- augment
def test_flip_mirrors_about_half_the_samples():
    x = torch.rand(64, 2, 5, 7)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert out.shape == x.shape and bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54
    assert torch.equal(random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=False), x)


def test_crop_is_a_window_of_the_zero_padded_image():
    x = torch.rand(32, 3, 6, 6) + 1  # strictly positive, so zero padding is visible
    p = 2
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=p, flip=False)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert int((out == 0).flatten(1).any(1).sum()) > 16  # most samples moved and show padding


def test_normalize_and_mixup():
    x = torch.rand(6, 3, 4, 4)
    y = normalize(x, (0.1, 0.2, 0.3), (0.5, 1.0, 2.0))
    assert torch.allclose(y[:, 2], (x[:, 2] - 0.3) / 2.0)
    assert torch.allclose(normalize(torch.ones(2, 5), (1.0,), (2.0,)), torch.zeros(2, 5))
    constant = torch.arange(8.0)[:, None, None, None].expand(8, 1, 3, 3).contiguous()
    mixed = mixup_inputs(constant, torch.Generator().manual_seed(0), alpha=0.4)
    again = mixup_inputs(constant, torch.Generator().manual_seed(0), alpha=0.4)
    assert mixed.shape == constant.shape and torch.equal(mixed, again)
    assert float(mixed.min()) >= 0 and float(mixed.max()) <= 7 and not torch.equal(mixed, constant)
    assert torch.allclose(mixed.mean(), constant.mean(), atol=1.5)
    with pytest.raises(DistillError, match="alpha"):
        mixup_inputs(constant, torch.Generator(), alpha=0)


# ---------------------------------------------------------------------------- split_validation
def test_split_validation_stratified_and_deterministic():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    ds = ArrayDataset(torch.arange(100).float()[:, None], targets)
    train, val = split_validation(ds, 0.1, seed=0)
    assert torch.bincount(val.targets).tolist() == [5, 3, 2]
    assert sorted(torch.cat([train.inputs, val.inputs]).flatten().long().tolist()) == list(range(100))
    train2, val2 = split_validation(ds, 0.1, seed=0)
    assert torch.equal(val.inputs, val2.inputs)
    _, val3 = split_validation(ds, 0.1, seed=1)
    assert not torch.equal(val.inputs, val3.inputs)
    with pytest.raises(DistillError, match="between 0 and 1"):
        split_validation(ds, 1.0, seed=0)
    with pytest.raises(DistillError, match="empty validation"):
        split_validation(ds, 0.001, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_split_validation_property(counts, fraction, seed):
    targets = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    targets = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))]
    ds = ArrayDataset(torch.arange(len(targets))[:, None], targets)
    expected = [round(c * fraction) for c in counts]
    if sum(expected) in (0, len(targets)):
        with pytest.raises(DistillError):
            split_validation(ds, fraction, seed)
        return
    train, val = split_validation(ds, fraction, seed)
    assert torch.bincount(val.targets, minlength=len(counts)).tolist() == expected
    ids = torch.cat([train.inputs, val.inputs]).flatten()
    assert sorted(ids.tolist()) == list(range(len(targets)))
    assert torch.equal(val.targets, targets[val.inputs.flatten()])
