"""CPU training speed: keep freed tensor memory in the process instead of returning it to the OS.

glibc's malloc serves large blocks (activations of a few MB) with ``mmap`` and gives them back
with ``munmap`` when freed, and trims the heap's free top; the next step then page-faults the same
amount in again. Depending on the order of allocations (which the distillation objective changes)
its adaptive threshold may or may not settle, and a step can spend a quarter of its time in page
faults: on a 2-core x86-64 CPU, a convolutional teacher's forward pass took 13.5 s an epoch instead
of 10.5 s (``benchmarks/speed.py``). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for
the same reason. :func:`keep_freed_memory` does the glibc equivalent in-process with ``mallopt``:
blocks up to 32 MiB (glibc's largest fixed threshold) come from the heap, and freed memory stays
in the process for reuse. The cost: the process's resident memory stays at its peak.

The trainer calls it once when it trains on the CPU; set ``DISTILL_KEEP_FREED_MEMORY=0`` to leave
the allocator alone. Other C libraries (musl) and other systems are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD = 2**31 - 1
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as described above, once per process; True when it is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DISTILL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
