"""Float64 reference implementations of the ops in `modeconn_fast.ops`: one point at a time, obviously right.

They are slow on purpose and exist for tests and for the correctness checks of the benchmarks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def combined_weight(coeffs: Tensor, stacked: Tensor, p: int) -> Tensor:
    """Σ_k coeffs[p, k] · stacked[k] in float64."""
    return sum(coeffs[p, k].double() * stacked[k].double() for k in range(stacked.shape[0]))


def combined_linear(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor) -> Tensor:
    """y[p] = x[p] @ W(p)ᵀ + b(p) with W(p) = Σ_k c[p,k] W_k, b(p) = Σ_k c[p,k] b_k; x [N, Din] or [P, N, Din]."""
    outputs = []
    for p in range(coeffs.shape[0]):
        x_p = (x if x.dim() == 2 else x[p]).double()
        b_p = None if bias is None else combined_weight(coeffs, bias, p)
        outputs.append(F.linear(x_p, combined_weight(coeffs, weight, p), b_p))
    return torch.stack(outputs)


def combined_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    coeffs: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """Convolution of x[p] (or the shared x) with W(p) = Σ_k c[p,k] W_k, 1-d or 2-d by weight's rank."""
    spatial = weight.dim() - 3
    conv = {1: F.conv1d, 2: F.conv2d}[spatial]
    outputs = []
    for p in range(coeffs.shape[0]):
        x_p = (x if x.dim() == spatial + 2 else x[p]).double()
        b_p = None if bias is None else combined_weight(coeffs, bias, p)
        outputs.append(conv(x_p, combined_weight(coeffs, weight, p), b_p, stride=stride, padding=padding,
                            dilation=dilation, groups=groups))
    return torch.stack(outputs)


def permutation_cost(a: Sequence[Tensor], b: Sequence[Tensor], perms: Sequence[Tensor | None]) -> Tensor:
    """Σ_j a[j] @ b[j][:, perms[j]]ᵀ in float64."""
    return sum(a_j.double() @ (b_j if perm is None else b_j[:, perm]).double().T for a_j, b_j, perm in zip(a, b, perms))
