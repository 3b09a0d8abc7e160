"""CIFAR-100 from its binary format: a folder, the tar, and a verified download (127.0.0.1 only)."""

import contextlib
import functools
import hashlib
import http.server
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import cifar100, load_dataset
from distill.data.cifar100 import parse_cifar100_records
from distill.errors import DistillError

FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def write_fake_cifar100(root: Path, train: int = 16, test: int = 8, seed: int = 0) -> dict:
    """A tiny ``cifar-100-binary`` folder under ``root`` in the official record format.

    Returns ``{"train"|"test": (images uint8 [N, 3, 32, 32], fine [N], coarse [N])}``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    written = {}
    for split, count in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, size=count, dtype=np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([coarse[:, None], fine[:, None], images.reshape(count, -1)], axis=1)
        (folder / f"{split}.bin").write_bytes(records.tobytes())
        written[split] = (images, fine, coarse)
    # the official name files end with blank lines
    (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n\n")
    return written


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def test_reads_folder_and_tar(tmp_path):
    written = write_fake_cifar100(tmp_path / "src")
    d = load_dataset("cifar100", tmp_path / "data", path=tmp_path / "src")  # the folder above it
    images, fine, _ = written["train"]
    assert d.name == "cifar100" and d.num_classes == 100 and d.input_shape == (3, 32, 32)
    assert d.train.inputs.shape == (16, 3, 32, 32) and d.train.inputs.dtype == torch.uint8
    assert d.test.inputs.shape == (8, 3, 32, 32) and len(d.test) == 8
    assert torch.equal(d.train.inputs, torch.from_numpy(images))  # red plane first, row-major
    assert d.train.targets.dtype == torch.int64 and d.train.targets.tolist() == fine.tolist()
    assert d.test.targets.tolist() == written["test"][1].tolist()
    assert d.class_names == FINE
    assert d.mean == (0.5071, 0.4867, 0.4408) and d.std == (0.2675, 0.2565, 0.2761)

    same = load_dataset("cifar100", tmp_path / "data", path=tmp_path / "src" / "cifar-100-binary")
    assert torch.equal(same.train.inputs, d.train.inputs)

    archive = tar_folder(tmp_path / "src" / "cifar-100-binary", tmp_path / "cifar-100-binary.tar.gz")
    a = load_dataset("cifar100", tmp_path / "data", path=archive)
    assert torch.equal(a.train.inputs, d.train.inputs) and torch.equal(a.test.targets, d.test.targets)
    assert a.class_names == FINE
    assert not (tmp_path / "data").exists(), "a local copy is read in place, nothing is written"


def test_coarse_labels(tmp_path):
    written = write_fake_cifar100(tmp_path)
    d = load_dataset("cifar100", tmp_path / "data", path=tmp_path, labels="coarse")
    assert d.num_classes == 20 and d.class_names == COARSE
    assert d.train.targets.tolist() == written["train"][2].tolist()
    assert d.test.targets.tolist() == written["test"][2].tolist()
    with pytest.raises(DistillError, match="labels must be 'fine' or 'coarse'"):
        load_dataset("cifar100", tmp_path / "data", path=tmp_path, labels="super")


def test_names_files_are_optional_but_checked(tmp_path):
    write_fake_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-binary"
    (folder / "fine_label_names.txt").unlink()
    assert load_dataset("cifar100", tmp_path / "data", path=folder).class_names is None
    (folder / "fine_label_names.txt").write_text("apple\npear\n")
    with pytest.raises(DistillError, match="lists 2 class names, expected 100"):
        load_dataset("cifar100", tmp_path / "data", path=folder)


def test_rejects_other_files(tmp_path):
    with pytest.raises(DistillError, match="not a multiple of the 3074-byte record"):
        parse_cifar100_records(b"\x00" * 3073 * 2, "cifar10.bin")  # two CIFAR-10 records
    record = np.zeros(3074, dtype=np.uint8)
    record[1] = 100  # fine label out of range
    with pytest.raises(DistillError, match="fine label 100 > 99"):
        parse_cifar100_records(record.tobytes(), "x.bin")
    record[1], record[0] = 3, 20
    with pytest.raises(DistillError, match="coarse label 20 > 19"):
        parse_cifar100_records(record.tobytes(), "x.bin", labels="fine")

    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="holds no train.bin and test.bin"):
        load_dataset("cifar100", tmp_path / "data", path=tmp_path / "empty")
    with pytest.raises(DistillError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "data", path=tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(DistillError, match="lacks the CIFAR-100 files train.bin, test.bin"):
        load_dataset("cifar100", tmp_path / "data", path=tar_folder(tmp_path / "other", tmp_path / "o.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DistillError, match="cannot read .* as a tar archive"):
        load_dataset("cifar100", tmp_path / "data", path=tmp_path / "junk.tar.gz")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server on 127.0.0.1 (a free port) serving ``directory``; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_is_verified_then_extracted_once(tmp_path, monkeypatch):
    """The official-archive path, on a small stand-in archive whose digest replaces the real one."""
    write_fake_cifar100(tmp_path / "src")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = tar_folder(tmp_path / "src" / "cifar-100-binary", mirror / "cifar-100-binary.tar.gz")
    data = tmp_path / "data"
    requests = _Quiet.requests
    requests.clear()
    with serve(mirror) as url:
        monkeypatch.setattr(cifar100, "CIFAR100_URL", url + "official/")  # never the real site from a test
        # the real digest refuses the stand-in, from the mirror and from the "official" site
        with pytest.raises(DistillError, match="checksum mismatch.*expected sha256 58a81ae1"):
            load_dataset("cifar100", data, mirror=url)
        assert list((data / "cifar100").iterdir()) == [], "no partial or unverified file is kept"
        assert requests == ["/cifar-100-binary.tar.gz", "/official/cifar-100-binary.tar.gz"]

        monkeypatch.setattr(cifar100, "CIFAR100_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        requests.clear()
        d = load_dataset("cifar100", data, mirror=url)
        assert d.train.inputs.shape == (16, 3, 32, 32) and len(d.test) == 8 and d.class_names == FINE
        assert requests == ["/cifar-100-binary.tar.gz"]
        assert (data / "cifar100" / "extracted" / "cifar-100-binary" / "train.bin").is_file()
        again = load_dataset("cifar100", data, mirror=url, labels="coarse")  # from the extracted copy
        assert again.num_classes == 20 and torch.equal(again.train.inputs, d.train.inputs)
        assert len(requests) == 1


def test_no_download_verifies_the_file_on_disk(tmp_path):
    folder = tmp_path / "data" / "cifar100"
    folder.mkdir(parents=True)
    with pytest.raises(DistillError, match="is missing; pass download=True or path="):
        load_dataset("cifar100", tmp_path / "data", download=False)
    (folder / "cifar-100-binary.tar.gz").write_bytes(b"something else")
    with pytest.raises(DistillError, match="expected 58a81ae1.*delete it and download again"):
        load_dataset("cifar100", tmp_path / "data", download=False)
