"""Keep freed memory in the process while an evaluation runs (glibc on Linux).

Chunk after chunk, the engine allocates and frees the same few megabytes of activations. glibc serves large
blocks with fresh mmap pages and hands freed heap tops back to the system, so every chunk pays page faults
again; on this project's 2-core machine that made B1 up to 2× slower and its timings erratic. For the
duration of a call the allocator is told to serve blocks up to 32 MiB from its heap and to keep what is
freed; afterwards the usual thresholds come back and the heap is trimmed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_TRIM, KEEP_MMAP = 1 << 30, 32 << 20
DEFAULT_TRIM = DEFAULT_MMAP = 128 << 10  # glibc's defaults


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Inside: large blocks come from the heap and freed memory stays in the process (no-op without glibc)."""
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP)
    _LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM)
    try:
        yield
    finally:
        _LIBC.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP)
        _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM)
        _LIBC.malloc_trim(0)
