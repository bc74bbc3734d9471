"""The engine's compiled CPU kernels (`cpu_kernels.py`, numba), loaded in the background once a process has spent
enough time in evaluations to gain from them.

Compiling them costs seconds; loading the compiled code from numba's on-disk cache (filled at install by `make`,
see `warm_up`) about 1 s of a core with `import numba` (4 s on a loaded machine). So they are loaded only once the
process has spent TORCH_SECONDS inside evaluations on CPU (`counting`, around `evaluate`'s passes), in a
background thread (`BackgroundLoad`); until they are ready, torch's paths go on. Jobs shorter than that never
load them.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from ..background_load import BackgroundLoad

TORCH_SECONDS = 1.0  # seconds of evaluations on CPU before the load starts


def _import_kernels() -> ModuleType:
    from . import cpu_kernels

    return cpu_kernels


_loading = BackgroundLoad(_import_kernels, "modeconn_fast-cpu-kernels-loading")
_seconds = [0.0]  # in finished evaluations
_since: list[float] = []  # the start of the evaluation in progress


@contextmanager
def counting() -> Iterator[None]:
    """Counts the time inside the block towards TORCH_SECONDS (an evaluation inside another counts once)."""
    if _since:
        yield
        return
    _since.append(time.perf_counter())
    try:
        yield
    finally:
        _seconds[0] += time.perf_counter() - _since.pop()


def kernels() -> ModuleType | None:
    """The compiled kernels' module where it is loaded, else None (the caller runs torch's path); starts the load
    once the evaluations so far took TORCH_SECONDS."""
    module = _loading.module()
    if module is not None:
        return module
    since = _since[:1]  # one copy: another thread's evaluation may end meanwhile
    if _seconds[0] + (time.perf_counter() - since[0] if since else 0.0) >= TORCH_SECONDS:
        load()
    return None


def load() -> None:
    """Start loading the compiled kernels in the background (once per process; later calls return at once)."""
    _loading.start()


def wait() -> bool:
    """Block until the load has finished (starting it if needed); whether it succeeded."""
    return _loading.wait() is not None


def warm_up() -> None:
    """Compile the kernels into numba's on-disk cache (`make` runs this at install)."""
    if not wait():
        raise RuntimeError("the compiled CPU kernels failed to load; see the error above")
