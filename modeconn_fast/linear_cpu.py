"""Large per-point linear products on CPU: oneDNN's linear point by point, or torch's batched product,
whichever this machine runs faster for the shape (timed once per shape and thread count, then remembered).

y[p] = x[p] @ W(p)ᵀ + b(p) for P points with their own inputs x [P, N, Din] and combined weights W [P, Dout, Din].
torch's `baddbmm` first copies the broadcast bias into the whole output and then runs MKL's GEMM over it;
oneDNN's linear adds the bias in its epilogue, and its GEMM ran faster on this project's AMD machine (B2's
second layer, [1797, 512] × [512, 512], one thread: 11.0 ms a point against 12.6 ms). Under contention for the
cores, though, a loop of per-point products waits on its threads at every point, and the batched product won
(two threads, load 3.3: 24 ms against 15 ms). Neither is right everywhere, so the first call of a shape times
both (twice each, alternating) and keeps the faster. Only products of at least MIN_MACS multiply-adds a point,
in float32 without gradients, are candidates: smaller ones lose to the loop's per-point overhead.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

MIN_MACS = 1 << 24  # multiply-adds of one point's product below which the per-point loop is never tried
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

_faster_per_point: dict[tuple[int, ...], bool] = {}  # (P, N, Din, Dout, has bias, threads) -> per-point wins
_allowed = [True]


@contextmanager
def plain_only(plain: bool) -> Iterator[None]:
    """While `plain` is True, `per_point_is_faster` answers False (the batched product is the reference path)."""
    before, _allowed[0] = _allowed[0], not plain
    try:
        yield
    finally:
        _allowed[0] = before


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ weightᵀ + bias by one batched product: x [P, N, Din], weight [P, Dout, Din], bias [P, Dout]."""
    w = weight.transpose(1, 2)
    return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """y = x @ weightᵀ + bias, then max(y, 0) if `relu`, by oneDNN's linear with the bias and the ReLU in its
    epilogue (no extra pass over y): x [N, Din], weight [Dout, Din], bias [Dout]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def per_point_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The same as `batched_linear`, one oneDNN linear per point (bias added in its epilogue)."""
    return torch.stack([onednn_linear(x[p], weight[p], None if bias is None else bias[p]) for p in range(x.shape[0])])


def per_point_is_faster(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `per_point_linear` is the faster way here (timed on the first call of each shape)."""
    P, N, Din = x.shape
    Dout = weight.shape[1]
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (not (ONEDNN and _allowed[0]) or N * Din * Dout < MIN_MACS or x.device.type != "cpu"
            or any(t.dtype != torch.float32 for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return False
    key = (P, N, Din, Dout, bias is not None, torch.get_num_threads())
    if key not in _faster_per_point:
        with torch.no_grad():
            seconds = best_seconds((per_point_linear, batched_linear), x, weight, bias)
        _faster_per_point[key] = seconds[0] < seconds[1]
    return _faster_per_point[key]


def best_seconds(runs: tuple[Callable[..., Tensor], ...], *args: Tensor | None) -> list[float]:
    """Each run's best time of two, the runs alternating."""
    best = [float("inf")] * len(runs)
    for _ in range(2):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run(*args)
            best[i] = min(best[i], time.perf_counter() - start)
    return best
