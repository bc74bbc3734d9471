"""Cross-entropy and arg-max errors of narrow float32 logits on CPU in one compiled pass (numba), per point.

For logits x [P, N, C] (C small, e.g. 10 digits), class targets y [N], and every point p:

    m = max_c x_c,   loss(p) = Σ_n [ log Σ_c exp(x_c − m) − (x_y − m) ],   wrong(p) = #{n : argmax_c x_c ≠ y}

(argmax: the first class holding the maximum, as torch's). torch runs these as six passes over the logits, each
slow on a class axis this narrow; the kernel reads them once, a block of rows at a time transposed into a class-
major buffer, so that the max, the exponentials and the sums run over contiguous rows (vectorised). exp has no
vector form in numba without Intel's SVML, so it is written out: exp(d) = 2ⁿ · e^f with n = round(d / ln 2),
f = d − n ln 2 (|f| ≤ ln 2 / 2, ln 2 in two parts as in Cody & Waite 1980) and e^f its Taylor polynomial of
degree 7 (relative error < 1e-8, below float32 rounding); d = x_c − m ≤ 0 is clamped at −87, where exp(d) is
below float32's smallest normal number and adds nothing a float32 sum could keep. log s (s in [1, C]) is written
out too: s = μ 2^e with μ in [1, 2), log μ = 2 atanh z = 2 Σ z^(2j+1)/(2j+1), z = (μ − 1)/(μ + 1) ≤ 1/3, to j = 6. Each row's loss is summed per
point in float64. A row with NaN or +inf, or whose logits are all −inf, gives NaN (as F.cross_entropy does).

Compiling costs seconds, loading the compiled code from numba's on-disk cache (filled at install by `make`,
see `warm_up`) about 1 s of a core with `import numba` (4 s on a loaded machine). So the kernel is loaded only
once the process has evaluated TORCH_ROWS rows of logits on torch's path (about 0.6 s of B1's work), in a daemon
thread; until it is ready, torch's path goes on (`metrics.py`). Small jobs never load it.
"""
from __future__ import annotations

import threading
from types import ModuleType

import torch
from torch import Tensor

_ready = threading.Event()  # the load has finished (or failed)
_started = threading.Event()
_starting = threading.Lock()
_compiled: list[ModuleType] = []  # the loaded kernel module, once loaded
TORCH_ROWS = 1 << 21  # rows of logits evaluated on torch's path before the load starts
_torch_rows = [0]


def load() -> None:
    """Start loading the compiled kernel in a daemon thread (once per process; later calls return at once)."""
    with _starting:
        if not _started.is_set():
            _started.set()
            threading.Thread(target=_load, name="modeconn_fast-cross-entropy-loading", daemon=True).start()


def _load() -> None:
    try:
        from . import cross_entropy_kernel

        _compiled.append(cross_entropy_kernel)
    finally:
        _ready.set()


def wait() -> bool:
    """Block until the load has finished; whether it succeeded."""
    load()
    _ready.wait()
    return bool(_compiled)


def use_kernel(logits: Tensor) -> bool:
    """Whether the kernel takes these logits: float32 CPU logits [P, N, C ≥ 1] without gradients (its only
    signature), once loaded. Rows it does not take count towards TORCH_ROWS."""
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 3
            and logits.shape[2] > 0 and not logits.requires_grad):
        return False
    if _compiled:
        return True
    _torch_rows[0] += logits.shape[0] * logits.shape[1]
    if _torch_rows[0] >= TORCH_ROWS:
        load()
    return False


def cross_entropy_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(loss sums float64 [P], wrong arg-max counts int64 [P]) of logits [P, N, C] against targets [N] in [0, C),
    once loaded (`use_kernel`). Any strides."""
    loss = torch.empty(logits.shape[0], dtype=torch.float64)
    wrong = torch.empty(logits.shape[0], dtype=torch.int64)
    _compiled[0].cross_entropy_sums(logits.detach().numpy(), targets.numpy(), loss.numpy(), wrong.numpy())
    return loss, wrong


def warm_up() -> None:
    """Compile the kernel into numba's on-disk cache (`make` runs this at install)."""
    if not wait():
        raise RuntimeError("the compiled cross-entropy kernel failed to load; see the error above")
