"""The compiled LAP (`lap.py`, numba) loads in a background thread; until it is ready, LAPs go to scipy.

Loading costs a new process about 0.6 s of CPU, most of it holding the GIL: `import numba` and numba's first
dispatch (its typing and target registries), then the compiled code read from numba's cache (several seconds if
the cache is empty: `make` fills it at install, see `lap.warm_up`). Run beside a call's own Python work it
would slow that call by about as much, so a process's first `weight_matching` starts the load only when it
returns, its LAPs of up to `SCIPY_WHILE_LOADING` units going to `scipy.optimize.linear_sum_assignment` (an exact
optimum as well: the same one but for exact ties); a call with a larger group starts the load at once and its
larger LAPs wait for the compiled solver, which is then faster than scipy's. Later calls use scipy until the
load is done. The thread is a `BackgroundLoad`: a process that ends during the load waits for it.
"""
from __future__ import annotations

from concurrent.futures import Executor
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..background_load import BackgroundLoad

if TYPE_CHECKING:
    from .lap import WarmStart

SCIPY_WHILE_LOADING = 1024  # largest LAP given to scipy rather than waiting for the compiled solver


def _import_lap() -> ModuleType:
    from . import lap

    lap.warm_up()  # compiles whatever numba's cache lacks
    return lap


_loading = BackgroundLoad(_import_lap, "modeconn_fast-lap-loading")


def start() -> None:
    """Start loading the compiled LAP in a background thread (once per process; later calls return at once)."""
    _loading.start()


def wait() -> None:
    """Block until the compiled LAP is loaded (starting the load if needed)."""
    _loading.wait()


def solve(cost: Tensor, warm: WarmStart | None = None, lanes: Executor | None = None) -> tuple[Tensor, WarmStart | None]:
    """`lap.solve_lap(cost, warm, lanes=lanes)` once the compiled solver is loaded; before, scipy's exact dense
    solver for up to SCIPY_WHILE_LOADING units (no warm start is left then), else start the load and wait for it.
    A cost on another device (CUDA) is copied to the CPU (by `solve_lap` on its path): only the LAP's input crosses."""
    if not _loading.ready and cost.shape[0] <= SCIPY_WHILE_LOADING:
        cols = linear_sum_assignment(np.ascontiguousarray(cost.cpu().double().numpy()), maximize=True)[1]
        return torch.as_tensor(cols, dtype=torch.long), None
    wait()
    from .lap import solve_lap

    return solve_lap(cost, warm, lanes=lanes)
