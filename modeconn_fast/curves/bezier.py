"""Bezier curve between two models (Garipov et al. 2018): θ(t) = Σ_k C(n, k) tᵏ (1 − t)ⁿ⁻ᵏ θ_k, n = bends + 1.

With one bend (the default) this is the quadratic curve of the paper: (1 − t)² θ_A + 2t(1 − t) θ_1 + t² θ_B.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .curve import Curve, check_t


def bernstein(t: Tensor, degree: int) -> Tensor:
    """Bernstein basis polynomials of `degree` at t: [len(t), degree + 1], rows summing to 1."""
    k, binomials = _exponents_and_binomials(degree, t.dtype)
    t = t.unsqueeze(1)
    return binomials * t.pow(k) * (1 - t).pow(degree - k)


@functools.cache
def _exponents_and_binomials(degree: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """k = 0 … degree and C(degree, k) (made once per degree: a curve's training asks every step)."""
    return (torch.arange(degree + 1, dtype=dtype),
            torch.tensor([math.comb(degree, i) for i in range(degree + 1)], dtype=dtype))


class BezierCurve(Curve):
    """A Bezier curve from model A to model B with `bends` free control points; see `Curve`."""

    def coefficients(self, t: Tensor | float) -> Tensor:
        return bernstein(check_t(t), self.size - 1)
