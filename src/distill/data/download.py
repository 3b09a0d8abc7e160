"""Fetching data files: verified downloads that never leave a partial file, and safe tar extraction.

Only the standard library's ``urllib`` is used. A download streams into a temporary file in the
destination's directory, is checked against its SHA-256 and only then renamed onto the
destination, so a file under its final name is always complete and verified.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from distill.errors import DistillError

log = logging.getLogger("distill.data")

_CHUNK = 1 << 20
_SCHEMES = ("http://", "https://", "file://")
_USER_AGENT = "distill (https://pypi.org/project/distill)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_file(tmp: str | Path, dest: str | Path) -> None:
    """Rename the finished temporary file ``tmp`` onto ``dest`` with ordinary permissions.

    ``tempfile.mkstemp`` creates files readable by their owner only; a shared data directory
    wants the permissions any new file would get under the current umask.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, dest)


def sha256_of(path: str | Path, *, gunzip: bool = False) -> str:
    """Hex SHA-256 of a file's bytes, or of its gunzipped content when ``gunzip``.

    Raises ``OSError`` / ``EOFError`` / ``zlib.error`` when ``gunzip`` and the file is not valid
    gzip (callers turn that into a :class:`DistillError` with context).
    """
    digest = hashlib.sha256()
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, sha256: str, gunzip: bool) -> bool:
    try:
        return sha256_of(path, gunzip=gunzip) == sha256.lower()
    except (OSError, EOFError, zlib.error):
        return False


def _reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
        if not isinstance(error, BaseException):
            return str(error)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(error, http.client.IncompleteRead):
        return "the connection closed before the whole file arrived"
    if isinstance(error, socket.gaierror):
        return "host not found"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return f"{type(error).__name__}: {error}"


_OFFLINE_FIX = "no network? download it elsewhere and point data.options.path at it"


def _short_reason(error: DistillError, url: str, timeout: float) -> str:
    """Why one URL failed, in a few words (for :func:`fetch_files`, which lists every mirror)."""
    cause = error.__cause__
    if cause is not None and not isinstance(cause, DistillError):
        return _reason(cause, timeout)
    text = str(error).replace(f" for {url}", "").replace(f"download of {url} is", "download")
    return text.replace(f"{url} is", "it is").split("; ")[0]


def download(
    url: str, dest: str | Path, sha256: str | None, timeout: float = 60, *, gunzip: bool = False
) -> Path:
    """Download ``url`` to ``dest`` and verify it; return ``dest``.

    ``sha256`` is the expected hex digest of the file, or of its gunzipped content when
    ``gunzip`` (so a re-compressed copy of the same content also verifies); ``None`` skips the
    check. When ``dest`` already exists with the right digest nothing is downloaded (with
    ``sha256=None`` an existing ``dest`` is trusted as it is).

    Raises :class:`DistillError` naming the URL on an HTTP error, a connection error, a timeout
    or a checksum mismatch (with expected and actual digests). In every failure the temporary
    file is deleted, so no partial file is left in ``dest``'s directory.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or _matches(dest, sha256, gunzip)):
        return dest
    if not url.startswith(_SCHEMES):
        raise DistillError(f"cannot download '{url}': only http://, https:// and file:// URLs are supported")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as error:
        raise DistillError(
            f"cannot write into {dest.parent} ({error.strerror or error}); choose a writable data directory "
            "(--data-dir or DISTILL_DATA)"
        ) from None
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s", url)
        digest = hashlib.sha256()
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            expected_length = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if expected_length is not None and expected_length.isdigit() and received != int(expected_length):
            raise DistillError(
                f"download of {url} is incomplete: {received} of {expected_length} bytes arrived; try again"
            )
        if sha256 is not None:
            if gunzip:
                try:
                    actual = sha256_of(tmp, gunzip=True)
                except (OSError, EOFError, zlib.error) as error:
                    raise DistillError(
                        f"{url} is not a valid gzip file ({error}); the mirror is broken, try another "
                        "(mirror=<base URL>)"
                    ) from None
            else:
                actual = digest.hexdigest()
            if actual != sha256.lower():
                what = "sha256 of the gunzipped content" if gunzip else "sha256"
                raise DistillError(
                    f"checksum mismatch for {url}: expected {what} {sha256.lower()}, got {actual}; "
                    "the file is corrupt or a different version: try again or use another mirror"
                )
        publish_file(tmp, dest)
        return dest
    except DistillError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        tmp.unlink(missing_ok=True)
        hint = (
            "check the URL or use another mirror" if isinstance(error, urllib.error.HTTPError)
            else _OFFLINE_FIX
        )
        raise DistillError(
            f"could not download {url}: {_reason(error, timeout)}; {hint}, or put the file in {dest.parent}"
        ) from error
    except BaseException:  # KeyboardInterrupt and friends: still no partial file
        tmp.unlink(missing_ok=True)
        raise


def fetch_files(
    base_urls: Iterable[str],
    files: Mapping[str, str | None],
    dest_dir: str | Path,
    *,
    gunzip: bool = False,
    timeout: float = 60,
) -> dict[str, Path]:
    """Download each ``name -> sha256`` of ``files`` into ``dest_dir``, trying mirrors in order.

    A file is fetched from ``base_url + name`` for the first mirror that serves it with the right
    checksum; a mirror that failed for one reason (404, dead host, wrong content) is skipped over
    to the next. After a success, later files try the mirror that worked first. ``gunzip`` has the
    meaning of :func:`download`. Returns ``{name: path}``; raises :class:`DistillError` (one line:
    the file, each mirror's reason, and how to supply the file by hand) when a file cannot be
    fetched from any of them.
    """
    mirrors = [u if u.endswith("/") else u + "/" for u in base_urls]
    if not mirrors:
        raise DistillError("no download mirror given")
    dest_dir = Path(dest_dir)
    out: dict[str, Path] = {}
    for name, sha256 in files.items():
        failures: dict[str, list[str]] = {}  # reason -> the mirrors that failed for it
        for base in list(mirrors):
            try:
                out[name] = download(base + name, dest_dir / name, sha256, timeout, gunzip=gunzip)
            except DistillError as error:
                if str(error).startswith("cannot write into"):  # the data directory, not the mirror
                    raise
                log.info("%s", error)  # the final error lists every mirror; a later mirror may still work
                failures.setdefault(_short_reason(error, base + name, timeout), []).append(base)
                continue
            mirrors.remove(base)
            mirrors.insert(0, base)
            break
        else:
            tried = "; ".join(f"{', '.join(bases)}: {reason}" for reason, bases in failures.items())
            raise DistillError(
                f"could not fetch {name} from any mirror ({tried}); {_OFFLINE_FIX}, or pass --data-dir "
                f"to a folder that holds it as {dest_dir.name}/{name}"
            )
    return out


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that would write or point outside the extraction directory."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in name.split("/"):
        raise DistillError(f"refusing to extract {archive}: member '{name}' would be written outside the target")
    if member.issym() or member.islnk():
        link = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, link))
        if link.startswith("/") or target == ".." or target.startswith("../"):
            raise DistillError(
                f"refusing to extract {archive}: link '{name}' points outside the target ('{link}')"
            )
    elif not (member.isfile() or member.isdir()):
        raise DistillError(f"refusing to extract {archive}: member '{name}' is a device, fifo or other special file")


def safe_extract_tar(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` (any tar compression) into the new directory ``dest``; return ``dest``.

    Every member is checked first: absolute names, names with ``..``, links pointing outside
    ``dest`` and special files raise :class:`DistillError` before anything is written. Members are
    extracted into a temporary directory beside ``dest`` which is then renamed onto ``dest``, so
    ``dest`` either does not exist or holds the whole archive. ``dest`` must not exist yet; if
    another process creates it meanwhile, its copy is kept.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise DistillError(f"cannot extract {archive}: {dest} already exists; delete it to extract again")
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise DistillError(f"{archive} is not a readable tar archive ({error}); delete it and fetch it again") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        with tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            # The "data" filter (Python >= 3.10.12 / 3.11.4) repeats the checks and drops unsafe modes.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; keep its copy
        return dest
    except DistillError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillError(
            f"could not extract {archive}: {error}; the archive may be truncated, fetch it again"
        ) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
