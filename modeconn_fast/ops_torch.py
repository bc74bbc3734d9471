"""Torch implementations of the ops and of their gradients: the CPU path, and the GPU path without Triton.

Notation: x [N, Din] (shared by all points) or [P, N, Din]; weight W [K, Dout, Din]; coeffs c [P, K];
W(p) = Σ_k c[p,k] W_k. Each function picks per shape the cheaper of two strategies (DESIGN §2; the timings
that chose them come from `python -m benchmarks.cpu_ops`):

- per basis (shared x only): Y_k = x @ W_kᵀ + b_k once for each of the K basis tensors, then y[p] = Σ_k c[p,k] Y_k;
- materialised: the P combined weights W(p) by one small GEMM, then one batched product over points
  (faster on 2 cores at the B1 and B2 shapes than one stacked GEMM followed by the reduction over k, and than
  a Python loop over points).

Convolutions follow the same two strategies; the batched product over points is a grouped convolution
(groups = P·groups). Gradients are written out by hand so that backward never differentiates through the
strategies above.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import linear_cpu


# On CPU, batched products with fewer than 16 output columns run about 3× slower than with 16 (measured with
# torch 2.13 / MKL on 2 cores: [16, 512, 32] × [16, 32, 10] 520 µs, padded to 16 columns 160 µs).
NARROW_OUTPUT = 16


def mix(coeffs: Tensor, stacked: Tensor) -> Tensor:
    """Σ_k coeffs[p, k] · stacked[k] for every point p: [P, K] × [K, *shape] -> [P, *shape]."""
    if stacked.dim() == 2:  # no reshapes: each would be one more node for autograd to walk
        return coeffs @ stacked
    return (coeffs @ stacked.reshape(stacked.shape[0], -1)).reshape(coeffs.shape[0], *stacked.shape[1:])


def per_basis_is_cheaper(points: int, bases: int, basis_cost: int, output_size: int, weight_size: int) -> bool:
    """Shared input: K products then a P×K mix of their outputs, versus P materialised weights and P products.

    basis_cost is the multiply-adds of one product with one weight (e.g. N·Din·Dout), output_size the elements
    of one point's output, weight_size the elements of one weight.
    """
    per_basis = bases * basis_cost + points * bases * output_size
    materialised = points * (bases * weight_size + basis_cost)
    return per_basis < materialised


def _nothing(like: Tensor) -> Tensor:
    """The placeholder returned for a gradient nobody asked for."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------- linear


def linear_per_basis(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Y_k = x @ W_kᵀ (+ b_k) for a shared x [N, Din]: [K, N, Dout]."""
    y = torch.matmul(x, weight.transpose(1, 2))
    return y if bias is None else y + bias.unsqueeze(1)


def linear_uses_per_basis(x: Tensor, weight: Tensor, coeffs: Tensor) -> bool:
    """Whether the shared-x strategy is the cheaper one for this call (always False for per-point x)."""
    if x.dim() != 2:
        return False
    (P, K), (_, Dout, Din), N = coeffs.shape, weight.shape, x.shape[0]
    return per_basis_is_cheaper(P, K, N * Din * Dout, N * Dout, Dout * Din)


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor) -> Tensor:
    """y[p] = x[p] @ W(p)ᵀ + b(p): [P, N, Dout]."""
    if linear_uses_per_basis(x, weight, coeffs):
        return mix(coeffs, linear_per_basis(x, weight, bias))
    w, b = combined_linear_weights(weight, bias, coeffs)
    return linear_of_combined(x, w, b, weight.shape[1])


def combined_linear_weights(weight: Tensor, bias: Tensor | None, coeffs: Tensor) -> tuple[Tensor, Tensor | None]:
    """The points' combined weights [P, Dout', Din] and biases [P, Dout'] for `linear_of_combined`: on CPU with
    Dout < NARROW_OUTPUT, padded with zero rows to Dout' = NARROW_OUTPUT (see there)."""
    Dout = weight.shape[1]
    if weight.device.type == "cpu" and Dout < NARROW_OUTPUT:
        weight = F.pad(weight, (0, 0, 0, NARROW_OUTPUT - Dout))
        bias = None if bias is None else F.pad(bias, (0, NARROW_OUTPUT - Dout))
    return mix(coeffs, weight), None if bias is None else mix(coeffs, bias)


def linear_of_combined(x: Tensor, w: Tensor, b: Tensor | None, out_features: int) -> Tensor:
    """y[p] = x[p] @ w[p]ᵀ + b[p], the first `out_features` columns: [P, N, out_features], for x [N, Din] (shared)
    or [P, N, Din] and the combined weights of `combined_linear_weights`."""
    if x.dim() == 2:
        x = x.expand(w.shape[0], *x.shape)
    if linear_cpu.per_point_is_faster(x, w, b):
        y = linear_cpu.per_point_linear(x, w, b)
    else:
        y = linear_cpu.batched_linear(x, w, b)
    return y if y.shape[-1] == out_features else y[..., :out_features].contiguous()


def linear_grad_input(grad: Tensor, weight: Tensor, coeffs: Tensor, shared: bool) -> Tensor:
    """∂/∂x: grad[p] @ W(p) per point ([P, N, Din]), or its sum over points for a shared x ([N, Din])."""
    P, K = coeffs.shape
    _, Dout, Din = weight.shape
    N = grad.shape[1]
    if not shared:
        return torch.bmm(grad, mix(coeffs, weight))
    if per_basis_is_cheaper(P, K, N * Din * Dout, N * Din, Dout * Din):  # Σ_k (Σ_p c[p,k] grad[p]) @ W_k
        per_basis_grad = mix(coeffs.T, grad)  # [K, N, Dout]
        return per_basis_grad.transpose(0, 1).reshape(N, K * Dout) @ weight.reshape(K * Dout, Din)
    return grad.transpose(0, 1).reshape(N, P * Dout) @ mix(coeffs, weight).reshape(P * Dout, Din)


def linear_grad_params(
    grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, need_weight: bool, need_coeffs: bool
) -> tuple[Tensor, Tensor]:
    """∂/∂W [K, Dout, Din] and the weight part of ∂/∂c [P, K] (empty tensors where not needed).

    ∂/∂W_k = Σ_p c[p,k] grad[p]ᵀ x[p];  ∂/∂c[p,k] = ⟨grad[p], x[p] @ W_kᵀ⟩ = ⟨grad[p]ᵀ x[p], W_k⟩.
    """
    P, K = coeffs.shape
    grad_weight, grad_coeffs = _nothing(grad), _nothing(grad)
    if linear_uses_per_basis(x, weight, coeffs):
        if need_weight:
            grad_weight = mix(coeffs.T, grad).transpose(1, 2) @ x
        if need_coeffs:
            grad_coeffs = grad.reshape(P, -1) @ linear_per_basis(x, weight, None).reshape(K, -1).T
        return grad_weight, grad_coeffs
    if x.dim() == 2:
        x = x.expand(P, *x.shape)
    grad_point_weight = torch.bmm(grad.transpose(1, 2), x).reshape(P, -1)  # ∂/∂W(p), flattened
    if need_weight:
        grad_weight = (coeffs.T @ grad_point_weight).reshape(weight.shape)
    if need_coeffs:
        grad_coeffs = grad_point_weight @ weight.reshape(K, -1).T
    return grad_weight, grad_coeffs


# ----------------------------------------------------------------------------------------- convolution


def conv_output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> list[int]:
    """Spatial output size of a convolution, as torch computes it."""
    return [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, k, s, p, d in zip(size, kernel, stride, padding, dilation)]


def _grouped_basis_order(weight: Tensor, groups: int) -> Tensor:
    """[K, Cout, ...] -> [groups·K·Cout/groups, ...]: the K kernels as one convolution that respects groups."""
    K, Cout = weight.shape[:2]
    return weight.reshape(K, groups, Cout // groups, *weight.shape[2:]).transpose(0, 1).reshape(K * Cout, *weight.shape[2:])


def _from_grouped_basis_order(y: Tensor, bases: int, groups: int) -> Tensor:
    """Inverse of `_grouped_basis_order` on the channel axis 1 of [N, groups·K·Cout/groups, ...] -> [K, N, Cout, ...]."""
    N, channels = y.shape[:2]
    y = y.reshape(N, groups, bases, channels // (groups * bases), *y.shape[2:]).permute(2, 0, 1, *range(3, y.dim() + 2))
    return y.reshape(bases, N, channels // bases, *y.shape[4:])


def _conv(spatial: int):
    return {1: F.conv1d, 2: F.conv2d}[spatial]


def conv_per_basis(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> Tensor:
    """Y_k = conv(x, W_k) (+ b_k) for a shared x [N, C, *spatial]: [K, N, Cout, *out], one convolution for all k."""
    K = weight.shape[0]
    stacked_bias = None if bias is None else _grouped_basis_order(bias, groups)
    y = _conv(weight.dim() - 3)(x, _grouped_basis_order(weight, groups), stacked_bias, stride, padding, dilation, groups)
    return _from_grouped_basis_order(y, K, groups)


def conv_uses_per_basis(x: Tensor, weight: Tensor, coeffs: Tensor, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int]) -> bool:
    """Whether the shared-x strategy is the cheaper one for this call (always False for per-point x)."""
    spatial = weight.dim() - 3
    if x.dim() != spatial + 2:
        return False
    P, K = coeffs.shape
    out = conv_output_size(x.shape[2:], weight.shape[3:], stride, padding, dilation)
    output_size = x.shape[0] * weight.shape[1] * torch.Size(out).numel()
    weight_size = weight[0].numel()
    return per_basis_is_cheaper(P, K, output_size * weight_size // weight.shape[1], output_size, weight_size)


def _points_as_channels(x: Tensor, points: int) -> Tensor:
    """[P, N, C, *sp] -> [N, P·C, *sp] for a convolution grouped over points."""
    return x.transpose(0, 1).reshape(x.shape[1], points * x.shape[2], *x.shape[3:])


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """y[p] = conv(x[p], W(p)) + b(p): [P, N, Cout, *out]."""
    spatial = weight.dim() - 3
    if conv_uses_per_basis(x, weight, coeffs, stride, padding, dilation):
        return mix(coeffs, conv_per_basis(x, weight, bias, stride, padding, dilation, groups))
    P, Cout = coeffs.shape[0], weight.shape[1]
    if x.dim() == spatial + 2:
        x = x.expand(P, *x.shape)
    w = mix(coeffs, weight).reshape(P * Cout, *weight.shape[2:])
    b = None if bias is None else mix(coeffs, bias).reshape(P * Cout)
    y = _conv(spatial)(_points_as_channels(x, P), w, b, stride, padding, dilation, P * groups)
    return y.reshape(y.shape[0], P, Cout, *y.shape[2:]).transpose(0, 1).contiguous()


def conv_backward(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, need_input: bool, need_weight: bool,
                  need_coeffs: bool) -> tuple[Tensor, Tensor, Tensor]:
    """∂/∂x, ∂/∂W and the weight part of ∂/∂c of `conv_forward` (empty tensors where not needed)."""
    spatial = weight.dim() - 3
    P, K = coeffs.shape
    Cout = weight.shape[1]
    shared = x.dim() == spatial + 2
    no_padding = [0] * spatial
    grad_x, grad_weight, grad_coeffs = _nothing(grad), _nothing(grad), _nothing(grad)
    if conv_uses_per_basis(x, weight, coeffs, stride, padding, dilation):
        if need_input or need_weight:  # the per-basis convolution's own backward, fed Σ_p c[p,k] grad[p]
            per_basis_grad = mix(coeffs.T, grad)  # [K, N, Cout, *out]
            N = grad.shape[1]
            layout = per_basis_grad.reshape(K, N, groups, Cout // groups, *grad.shape[3:]).permute(1, 2, 0, *range(3, spatial + 4))
            gx, gw, _ = torch.ops.aten.convolution_backward(
                layout.reshape(N, K * Cout, *grad.shape[3:]), x, _grouped_basis_order(weight, groups), None, stride,
                padding, dilation, False, no_padding, groups, [need_input, need_weight, False])
            grad_x = gx if need_input else grad_x
            if need_weight:
                grad_weight = gw.reshape(groups, K, Cout // groups, *weight.shape[2:]).transpose(0, 1).reshape(weight.shape)
        if need_coeffs:
            per_basis = conv_per_basis(x, weight, None, stride, padding, dilation, groups)
            grad_coeffs = grad.reshape(P, -1) @ per_basis.reshape(K, -1).T
        return grad_x, grad_weight, grad_coeffs
    if shared:
        x = x.expand(P, *x.shape)
    w = mix(coeffs, weight)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        _points_as_channels(grad, P), _points_as_channels(x, P), w.reshape(P * Cout, *weight.shape[2:]), None, stride,
        padding, dilation, False, no_padding, P * groups, [need_input, need_weight or need_coeffs, False])
    if need_input:
        gx = gx.reshape(gx.shape[0], P, *x.shape[2:]).transpose(0, 1)
        grad_x = gx.sum(0) if shared else gx.contiguous()
    if need_weight or need_coeffs:
        grad_point_weight = gw.reshape(P, -1)
        if need_weight:
            grad_weight = (coeffs.T @ grad_point_weight).reshape(weight.shape)
        if need_coeffs:
            grad_coeffs = grad_point_weight @ weight.reshape(K, -1).T
    return grad_x, grad_weight, grad_coeffs


# ------------------------------------------------------------------------------------ permutation cost


def permutation_cost(a: Sequence[Tensor], b: Sequence[Tensor], perms: Sequence[Tensor | None]) -> Tensor:
    """Σ_j a[j] @ b[j][:, perms[j]]ᵀ -> [n, n]."""
    cost = a[0].new_zeros(a[0].shape[0], b[0].shape[0])
    for a_j, b_j, perm in zip(a, b, perms):
        cost.addmm_(a_j, (b_j if perm is None else b_j[:, perm]).T)
    return cost
