"""Reader for IDX files, the format of MNIST and Fashion-MNIST (gzip-compressed or raw).

Layout: two zero bytes, a type code, the number of dimensions ``d``; then ``d`` big-endian
``uint32`` sizes; then the values, big-endian, in C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from distill.errors import DistillError

IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx_bytes(path: str | Path) -> bytes:
    """The IDX bytes of ``path``, decompressed when the file is gzip (detected by its magic)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DistillError(f"cannot read {path}: {error.strerror or error}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DistillError(
                f"{path} is a corrupt or truncated gzip file ({error}); delete it and download it again"
            ) from None
    return data


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse raw (uncompressed) IDX bytes into an array in native byte order.

    Raises :class:`DistillError` naming ``source`` on a wrong magic number, an unknown type code
    or a size that does not match the header (truncated file or trailing bytes).
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DistillError(
            f"{source} is not an IDX file (wrong magic number {data[:4].hex() or 'empty'}); "
            "delete it and download it again"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise DistillError(f"{source} has unknown IDX type code 0x{code:02x}; the file is corrupt")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DistillError(f"{source} is truncated inside its header; delete it and download it again")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DistillError(
            f"{source} is {what}: header {shape} needs {expected} bytes of values, found {actual}; "
            "delete it and download it again"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` or raw), e.g. ``[60000, 28, 28]`` uint8."""
    return parse_idx(read_idx_bytes(path), str(path))
