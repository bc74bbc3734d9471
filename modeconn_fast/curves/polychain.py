"""Polygonal chain between two models (Garipov et al. 2018): straight segments through the control points.

    c_k(t) = max(0, 1 − |t·(K − 1) − k|)      (hat functions; K = bends + 2 control points at t = k/(K − 1))
"""
from __future__ import annotations

import torch
from torch import Tensor

from .curve import Curve, check_t


def hat_functions(t: Tensor, points: int) -> Tensor:
    """Piecewise-linear interpolation weights of `points` evenly spaced knots at t: [len(t), points]."""
    k = torch.arange(points, dtype=t.dtype)
    return (1 - (t.unsqueeze(1) * (points - 1) - k).abs()).clamp_min(0)


class PolyChain(Curve):
    """A polygonal chain from model A to model B through `bends` free control points; see `Curve`."""

    def coefficients(self, t: Tensor | float) -> Tensor:
        return hat_functions(check_t(t), self.size)
