"""Downloads against a local HTTP server: verification, mirrors, and no partial files on failure."""

import contextlib
import functools
import hashlib
import http.server
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import cifar, load_dataset
from distill.data.download import download, fetch_files
from distill.data.mnist import MNIST_FILES
from distill.errors import DistillError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        if self.path.startswith("/truncated"):  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/silent"):  # never answers
            threading.Event().wait(3)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server on 127.0.0.1 (a free port) serving ``directory``; yields its base URL."""
    handler = functools.partial(_Handler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server():
    """../shared/data served on 127.0.0.1."""
    if not SHARED.is_dir():
        raise RuntimeError(f"test data folder {SHARED} is missing")
    with serve(SHARED) as url:
        yield url


@pytest.fixture()
def requests():
    _Handler.requests.clear()
    return _Handler.requests


def test_mnist_download_from_mirror_verifies_content(server, tmp_path, requests):
    data = load_dataset("mnist", tmp_path, mirror=server + "mnist/")
    folder = tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES), "all four files, no leftovers"
    # the shared image files were re-compressed: only their uncompressed content matches the official one
    served = (SHARED / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    assert (folder / "train-images-idx3-ubyte.gz").read_bytes() == served
    assert data.train.inputs.shape == (60000, 1, 28, 28) and data.test.targets[:3].tolist() == [7, 2, 1]
    assert len(requests) == 4
    load_dataset("mnist", tmp_path, mirror=server + "mnist/")
    assert len(requests) == 4, "verified files are not downloaded again"


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    dest = tmp_path / "dl" / "labels.gz"
    with pytest.raises(DistillError) as err:
        download(server + "mnist/t10k-labels-idx1-ubyte.gz", dest, "0" * 64)
    message = str(err.value)
    actual = hashlib.sha256((SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert "checksum mismatch" in message and "0" * 64 in message and actual in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert list(dest.parent.iterdir()) == []


def test_existing_verified_file_is_kept(server, tmp_path, requests):
    source = SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "labels.gz"
    dest.write_bytes(source.read_bytes())
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert download(server + "mnist/t10k-labels-idx1-ubyte.gz", dest, sha) == dest
    assert requests == []
    dest.write_bytes(b"stale")  # a wrong file is replaced
    download(server + "mnist/t10k-labels-idx1-ubyte.gz", dest, sha)
    assert dest.read_bytes() == source.read_bytes() and len(requests) == 1


def test_404_mirror_falls_back_to_next(server, tmp_path, requests):
    name = "t10k-labels-idx1-ubyte.gz"
    out = fetch_files([server + "nowhere/", server + "mnist"], {name: MNIST_FILES[name]}, tmp_path, gunzip=True)
    assert out[name].read_bytes() == (SHARED / "mnist" / name).read_bytes()
    assert requests == ["/nowhere/" + name, "/mnist/" + name]
    with pytest.raises(DistillError, match="from any mirror") as err:
        fetch_files([server + "a/", server + "b/"], {name: None}, tmp_path / "x")
    assert "HTTP 404" in str(err.value) and "/a/" in str(err.value) and "/b/" in str(err.value)
    assert not (tmp_path / "x").exists() or list((tmp_path / "x").iterdir()) == []


def test_dead_server_raises_and_leaves_no_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mnist/t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DistillError, match=f"could not download {url}"):
        download(url, tmp_path / "f.gz", None, timeout=5)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DistillError, match="from any mirror"):
        fetch_files([f"http://127.0.0.1:{port}/"], {"t10k-labels-idx1-ubyte.gz": None}, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_truncated_and_silent_responses(server, tmp_path):
    with pytest.raises(DistillError, match="incomplete|closed before the whole file"):
        download(server + "truncated", tmp_path / "t.bin", None)
    with pytest.raises(DistillError, match="no answer within 0.5 s"):
        download(server + "silent", tmp_path / "s.bin", None, timeout=0.5)
    assert list(tmp_path.iterdir()) == []


def test_bad_gzip_content_is_a_checksum_failure(server, tmp_path):
    with pytest.raises(DistillError, match="not a valid gzip"):
        download(server + "README.md", tmp_path / "r.gz", "0" * 64, gunzip=True)
    assert list(tmp_path.iterdir()) == []


def test_cifar10_download_verify_extract(tmp_path, monkeypatch, requests):
    """The official-archive path, on a small stand-in archive whose digest replaces the real one."""
    rng = np.random.default_rng(0)
    batches = tmp_path / "src" / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(4, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (batches / name).write_bytes(records.tobytes())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-bin")
    with serve(mirror) as url:
        monkeypatch.setattr(cifar, "CIFAR10_URL", url + "official/")  # never the real site from a test
        with pytest.raises(DistillError, match="checksum mismatch.*expected sha256 c4a38c50"):
            load_dataset("cifar10", tmp_path / "data", mirror=url)  # the real digest refuses the stand-in
        assert list((tmp_path / "data" / "cifar10").iterdir()) == []
        assert requests == ["/cifar-10-binary.tar.gz", "/official/cifar-10-binary.tar.gz"]
        monkeypatch.setattr(cifar, "CIFAR10_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        requests.clear()
        d = load_dataset("cifar10", tmp_path / "data", mirror=url)
        assert d.train.inputs.shape == (20, 3, 32, 32) and len(d.test) == 4 and requests == ["/cifar-10-binary.tar.gz"]
        assert (tmp_path / "data" / "cifar10" / "cifar-10-binary" / "cifar-10-batches-bin" / "test_batch.bin").is_file()
        again = load_dataset("cifar10", tmp_path / "data", mirror=url)
        assert torch.equal(again.train.inputs, d.train.inputs) and len(requests) == 1
