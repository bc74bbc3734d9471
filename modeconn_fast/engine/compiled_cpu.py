"""The engine's compiled CPU kernels (`cpu_kernels.py`, numba), loaded in the background once a process has done
enough work on torch's paths to gain from them.

Compiling them costs seconds; loading the compiled code from numba's on-disk cache (filled at install by `make`,
see `warm_up`) about 1 s of a core with `import numba` (4 s on a loaded machine). So they are loaded only once the
process has run TORCH_ROWS rows (points × samples) on the torch paths they replace (about 0.6 s of B1's work),
in a daemon thread; until they are ready, torch's paths go on. Small jobs never load them.
"""
from __future__ import annotations

import threading
from types import ModuleType

TORCH_ROWS = 1 << 21  # rows run on torch's paths before the load starts

_ready = threading.Event()  # the load has finished (or failed)
_started = threading.Event()
_starting = threading.Lock()
_compiled: list[ModuleType] = []  # the loaded kernel module, once loaded
_torch_rows = [0]


def kernels(rows: int) -> ModuleType | None:
    """The compiled kernels' module where it is loaded, else None, counting `rows` towards TORCH_ROWS (the
    caller then runs these rows on torch's path)."""
    if _compiled:
        return _compiled[0]
    _torch_rows[0] += rows
    if _torch_rows[0] >= TORCH_ROWS:
        load()
    return None


def load() -> None:
    """Start loading the compiled kernels in a daemon thread (once per process; later calls return at once)."""
    with _starting:
        if not _started.is_set():
            _started.set()
            threading.Thread(target=_load, name="modeconn_fast-cpu-kernels-loading", daemon=True).start()


def _load() -> None:
    try:
        from . import cpu_kernels

        _compiled.append(cpu_kernels)
    finally:
        _ready.set()


def wait() -> bool:
    """Block until the load has finished (starting it if needed); whether it succeeded."""
    load()
    _ready.wait()
    return bool(_compiled)


def warm_up() -> None:
    """Compile the kernels into numba's on-disk cache (`make` runs this at install)."""
    if not wait():
        raise RuntimeError("the compiled CPU kernels failed to load; see the error above")
