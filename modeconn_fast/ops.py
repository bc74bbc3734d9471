"""The engine's primitives: layers whose weights are a combination of K basis tensors, for P points at once.

    combined_linear:  y[p] = x[p] @ (Σ_k c[p,k] W_k)ᵀ + Σ_k c[p,k] b_k
    combined_conv:    the same for Conv1d / Conv2d

`x` is either shared by all points (no leading point axis) or carries one: [P, N, ...]. These are the torch
implementations, which pick per call the cheaper of two strategies (see DESIGN §2):
  - shared x: compute x @ W_kᵀ once per basis tensor, then mix the K results per point;
  - otherwise: materialise the P combined weights with one small GEMM and run a batched product.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def mix(coeffs: Tensor, stacked: Tensor) -> Tensor:
    """Σ_k coeffs[p, k] · stacked[k] for every point p: [P, K] × [K, *shape] -> [P, *shape]."""
    return (coeffs @ stacked.reshape(stacked.shape[0], -1)).reshape(coeffs.shape[0], *stacked.shape[1:])


def combined_linear(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor) -> Tensor:
    """x [N, Din] (shared) or [P, N, Din]; weight [K, Dout, Din]; bias [K, Dout] or None; coeffs [P, K] -> [P, N, Dout]."""
    P, K = coeffs.shape
    _, Dout, Din = weight.shape
    if x.dim() == 2:
        N = x.shape[0]
        shared_flops = K * N * Din * Dout + P * K * N * Dout
        materialised_flops = P * (K * Dout * Din + N * Din * Dout)
        if shared_flops < materialised_flops:
            per_basis = (x @ weight.reshape(K * Dout, Din).T).reshape(N, K, Dout).transpose(0, 1)  # [K, N, Dout]
            y = mix(coeffs, per_basis)
            return y if bias is None else y + mix(coeffs, bias).unsqueeze(1)
        x = x.unsqueeze(0).expand(P, N, Din)
    w = mix(coeffs, weight).transpose(1, 2)  # [P, Din, Dout]
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(mix(coeffs, bias).unsqueeze(1), x, w)


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
    """Convolution with combined kernels, 1-d or 2-d by weight's rank.

    x [N, C, *spatial] (shared) or [P, N, C, *spatial]; weight [K, Cout, C/groups, *kernel]; bias [K, Cout] or
    None; coeffs [P, K] -> [P, N, Cout, *spatial_out]. Per-point inputs run as one grouped convolution over
    points (groups = P·groups).
    """
    P, K = coeffs.shape
    spatial = weight.dim() - 3
    conv = {1: F.conv1d, 2: F.conv2d}[spatial]
    Cout = weight.shape[1]
    options = dict(stride=stride, padding=padding, dilation=dilation)
    if x.dim() == spatial + 2:  # shared by all points: one convolution with the K stacked kernels
        N = x.shape[0]
        # Output channels of a grouped convolution are group-major: stack the K kernels inside each group.
        kernel = weight.reshape(K, groups, Cout // groups, *weight.shape[2:]).transpose(0, 1)
        per_basis = conv(x, kernel.reshape(K * Cout, *weight.shape[2:]), None, groups=groups, **options)
        out_spatial = per_basis.shape[2:]
        per_basis = per_basis.reshape(N, groups, K, Cout // groups, *out_spatial).permute(2, 0, 1, *range(3, 4 + spatial))
        y = mix(coeffs, per_basis.reshape(K, N, Cout, *out_spatial))  # [P, N, Cout, *out]
    else:
        N, C = x.shape[1], x.shape[2]
        stacked_x = x.transpose(0, 1).reshape(N, P * C, *x.shape[3:])
        w = mix(coeffs, weight).reshape(P * Cout, *weight.shape[2:])
        y = conv(stacked_x, w, None, groups=P * groups, **options)
        out_spatial = y.shape[2:]
        y = y.reshape(N, P, Cout, *out_spatial).transpose(0, 1)
    if bias is not None:
        y = y + mix(coeffs, bias).reshape(P, 1, Cout, *([1] * spatial))
    return y


def permutation_cost(a: Sequence[Tensor], b: Sequence[Tensor], perms: Sequence[Tensor | None]) -> Tensor:
    """Weight-matching cost of one permutation group: Σ_j a[j] @ b[j][:, perms[j]]ᵀ -> [n, n].

    a[j], b[j] are [n, m_j] (the group's axis first, everything else flattened); perms[j] permutes the
    other axis of b[j] (a LongTensor of length m_j) or is None.
    """
    cost = a[0].new_zeros(a[0].shape[0], a[0].shape[0])
    for a_j, b_j, perm in zip(a, b, perms):
        cost.addmm_(a_j, (b_j if perm is None else b_j[:, perm]).T)
    return cost
