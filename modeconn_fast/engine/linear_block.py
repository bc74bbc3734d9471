"""SubspaceLinear → [ReLU] → SubspaceLinear → [ReLU] … of an nn.Sequential, run point by point as one block.

In evaluation on CPU (no gradients recorded, float32, oneDNN available) and where the largest product of the run is
large (at least `linear_cpu.MIN_MACS` multiply-adds a point), the block takes one point at a time through all its
layers: h ← relu(h @ W(p)ᵀ + b(p)), one oneDNN linear per layer with the bias and the ReLU in its epilogue. A
point's activations ([N, D], a few MB) then stay in cache from one layer to the next, where the layer-by-layer path
writes each layer's output for all the chunk's points ([P, N, D], tens of MB) to memory and reads it back for the
ReLU and for the next product (B2, MLP 64-512-512-10 on 1,797 samples, one thread, profiled: the ReLU passes over
[P·N, 512] took 4.7× as long as a per-point loop's passes over the same numbers in cache, and stacking the per-point
products cost half as much again; point by point the evaluation ran 1.10-1.13× faster).

The first layer, fed the input shared by all points, keeps its K per-basis outputs Y_k (as `SubspaceLinear` does)
and mixes each point's Σ_k c[p,k] Y_k on its own, ReLU applied in place on that buffer (the block's own).
Point by point loses where other processes keep the cores busy, so the first call of each shape times it against the
layers run one after another for all points, each ReLU in place on its Linear's output (B2, one thread, profiled:
the ReLU passes 17-25 ms instead of 40-62 ms, the whole evaluation 0.5-7 % faster), and keeps the faster.
Anywhere else (gradients, GPU, other dtypes, small products, the view's plain mode) the layers run one after another.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import linear_cpu, ops
from .layers import SubspaceLinear, has_forward_hooks


_faster_per_point: dict[tuple, bool] = {}  # (shapes, shared input, layers, threads) -> point by point wins


class LinearBlock(nn.Module):
    """Linear layers, each optionally followed by ReLU, with the point-by-point fast path above."""

    def __init__(self, layers: list[tuple[SubspaceLinear, nn.ReLU | None]]):
        super().__init__()
        self.layers = layers  # a plain list: the modules stay registered only where the model has them
        self.state = layers[0][0].state

    def forward(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return self._plain(x)
        return self._per_point(x) if self._per_point_is_faster(x) else self._layer_by_layer(x)

    def _plain(self, x: Tensor) -> Tensor:
        for linear, relu in self.layers:
            x = linear(x)
            x = x if relu is None else relu(x)
        return x

    def _layer_by_layer(self, x: Tensor) -> Tensor:
        """The layers one after another, each ReLU in place on its Linear's output (a new tensor that nothing
        outside the block sees): no second [P·N, D] buffer per ReLU."""
        for linear, relu in self.layers:
            x = linear(x)
            x = x if relu is None else x.relu_()
        return x

    def _per_point(self, x: Tensor) -> Tensor:
        state = self.state
        points, coeffs = state.points, state.coeffs
        first, first_relu = self.layers[0]
        shared = state.shared_rows(x)
        per_basis = None
        if shared is not None:
            rows = shared[1].reshape(-1, first.in_features)
            weight, bias = first.stacked["weight"], first.stacked.get("bias")
            if weight.shape[0] < first.in_features:  # as SubspaceLinear: mixing K outputs costs less than a product
                per_basis = first.per_basis_outputs((shared[0], rows),
                                                    lambda eye: ops.combined_linear(rows, weight, bias, eye))
            inputs = rows.expand(points, *rows.shape)
        else:
            inputs = x.reshape(points, -1, first.in_features)
        layers = self.layers[1:] if per_basis is not None else self.layers
        mixed = [(ops.mix(coeffs, linear.stacked["weight"]), _mixed_bias(linear, coeffs), relu)
                 for linear, relu in layers]
        out = None
        if per_basis is not None:  # one buffer for every point's first activation (this block's own)
            first_out = per_basis.new_empty(per_basis.shape[1:])
            point_weights = coeffs.tolist()
        for p in range(points):
            if per_basis is not None:
                h = _mix_into(first_out, per_basis, point_weights[p])
                h = h if first_relu is None else h.relu_()
            else:
                h = inputs[p]
            for weight, bias, relu in mixed:
                h = linear_cpu.onednn_linear(h, weight[p], None if bias is None else bias[p], relu=relu is not None)
            if out is None:
                out = h.new_empty(points, *h.shape)
            out[p] = h
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _fast(self, x: Tensor) -> bool:
        state = self.state
        if (torch.is_grad_enabled() or state.plain or not linear_cpu.ONEDNN or x.device.type != "cpu"
                or x.dtype != torch.float32 or any(l.stacked["weight"].dtype != torch.float32 for l, _ in self.layers)):
            return False
        rows = x.numel() // (x.shape[-1] * max(1, state.points))
        largest = max(l.in_features * l.out_features for l, _ in self.layers)
        return rows * largest >= linear_cpu.MIN_MACS

    def _per_point_is_faster(self, x: Tensor) -> bool:
        """Timed on the first call of each shape and thread count (each way twice, alternating; the best of each):
        point by point won on one thread, and lost to the layer-by-layer path on 2 threads while other processes
        kept both cores busy (every per-point step then waits for a descheduled thread)."""
        key = (tuple(x.shape[1:]), x.numel() // max(1, self.state.points), self.state.shared_rows(x) is not None,
               tuple((linear.in_features, linear.out_features, relu is not None) for linear, relu in self.layers),
               torch.get_num_threads())
        if key not in _faster_per_point:
            seconds = linear_cpu.best_seconds((self._per_point, self._layer_by_layer), x)
            _faster_per_point[key] = seconds[0] < seconds[1]
        return _faster_per_point[key]


def _mix_into(out: Tensor, stacked: Tensor, weights: list[float]) -> Tensor:
    """out = Σ_k weights[k] · stacked[k], by K element-wise passes over `out` (in cache; at B2's first layer on 2
    threads 0.18 ms against 0.54 ms for the [1, K] × [K, N·D] product)."""
    torch.mul(stacked[0], weights[0], out=out)
    for k in range(1, len(weights)):
        out.add_(stacked[k], alpha=weights[k])
    return out


def _mixed_bias(linear: SubspaceLinear, coeffs: Tensor) -> Tensor | None:
    bias = linear.stacked.get("bias")
    return None if bias is None else ops.mix(coeffs, bias)


def linear_block_at(modules: list[nn.Module], start: int) -> tuple[LinearBlock, int] | None:
    """The LinearBlock of the run of SubspaceLinear [→ ReLU] layers (without hooks) that begins at modules[start],
    and the index after it; None where there is nothing to fuse (no such layer there, or a lone one without ReLU:
    `linear_cpu` already picks its product per shape)."""
    layers: list[tuple[SubspaceLinear, nn.ReLU | None]] = []
    i = start
    while i < len(modules) and type(modules[i]) is SubspaceLinear and not has_forward_hooks(modules[i]):
        after = modules[i + 1] if i + 1 < len(modules) else None
        relu = after if type(after) is nn.ReLU and not has_forward_hooks(after) else None
        layers.append((modules[i], relu))
        i += 1 + (relu is not None)
    if not layers or (len(layers) == 1 and layers[0][1] is None):
        return None
    return LinearBlock(layers), i
