"""Keep freed memory in the process (glibc on Linux), for the library's repeated work on the CPU.

Step after step, evaluation chunks, training steps and weight matching's visits allocate and free the same few
megabytes (activations, autograd's saved tensors, cost-update products). By default glibc serves such blocks with
fresh mmap pages and hands freed heap tops back to the system, so every chunk, step or call pays page faults
again; on this project's 2-core machine that made B1 up to 2× slower and its timings erratic, a 512-unit weight
matching faulted 2,000-3,400 pages a call (8-12 ms of system time, 10-13 % of its wall time) and B6's curve
training at 8 t per step 12-31k pages a run. The first CPU evaluation (`engine.evaluate`), training loop
(`curves.train.minibatches`) or weight matching therefore tells the allocator (mallopt) to serve blocks up to
32 MiB from its heap and to keep up to 1 GiB of freed memory. This lasts for the rest of the process (glibc's
adaptive threshold stays off); set MODECONN_KEEP_FREED_MEMORY=0 to leave the allocator alone.
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
    libc = _c_library()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM)


def _c_library() -> ctypes.CDLL | None:
    """The process's C library, or None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
