"""Keep freed memory in the process (glibc on Linux), for evaluations on CPU.

Chunk after chunk, the engine allocates and frees the same few megabytes of activations. By default glibc
serves such blocks with fresh mmap pages and hands freed heap tops back to the system, so every chunk pays
page faults again; on this project's 2-core machine that made B1 up to 2× slower and its timings erratic.
The first evaluation on CPU therefore tells the allocator (mallopt) to serve blocks up to 32 MiB from its heap
and to keep up to 1 GiB of freed memory. This lasts for the rest of the process (glibc's adaptive threshold
stays off); set MODECONN_KEEP_FREED_MEMORY=0 to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_TRIM, KEEP_MMAP = 1 << 30, 32 << 20

_done = False


def keep_freed_memory() -> None:
    """Once per process: large blocks from the heap, freed memory kept (no-op without glibc or when opted out)."""
    global _done
    if _done:
        return
    _done = True
    if os.environ.get("MODECONN_KEEP_FREED_MEMORY", "1") == "0":
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM)
