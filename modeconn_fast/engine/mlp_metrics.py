"""A whole MLP and its loss and error at many points in one compiled pass (CPU, evaluation).

For a converted nn.Sequential Linear → [ReLU] → Linear → … → Linear (no other modules, no hooks) whose logits
have fewer than `metrics.SMALL_CLASSES` classes, evaluated for loss and error only with the default
cross-entropy, `cpu_kernels.mlp_cross_entropy_sums` runs every point through all layers a block of samples at a
time and reduces the block's logits at once, so no activation or logit leaves the cache:

    h1(p) = [ReLU] Σ_k c[p,k] Y_k,   Y_k = X W1_kᵀ + b1_k  (the shared input's K products, once per batch)
    h_l(p) = [ReLU] (h_{l−1}(p) W_l(p)ᵀ + b_l(p)),  W_l(p) = Σ_k c[p,k] W_l,k
    loss(p), wrong(p) as `cpu_kernels.cross_entropy_sums` of the last layer's output.

The layer-by-layer path instead writes every layer's output for a chunk of points to memory and reads it back
for the ReLU, the next product and the metric (B1, MLP 64-32-32-10 on 512 samples, one thread: 54 µs a point
against 143 µs, load 6). It runs once the compiled kernels are loaded (`compiled_cpu.py`; a call of WAIT_MACS
or more waits for them), on float32 without gradients, where the first layer's K per-basis products cost less
than a product per point (K < its inputs) and no layer has more than MAX_WIDTH outputs (wider products run
faster in torch's GEMMs); `evaluate(..., fast=False)` never takes it.
"""
from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor, nn

from . import compiled_cpu
from .conv_block import FusedSequential
from .layers import SubspaceLinear, has_forward_hooks
from .metrics import SMALL_CLASSES, MetricSums
from .view import SubspaceView

# Layers up to this many outputs are fused (MLP 64-w-w-10 on 512 samples, one thread, µs a point, fused against
# layer by layer: w = 32: 54 / 143; 64: 138 / 341; 128: 661 / 1263; 256: 3021 / 2658, where oneDNN's and MKL's
# GEMMs outrun the kernel's plain loops).
MAX_WIDTH = 128
# A call of at least this many multiply-adds (points × samples × Σ Din·Dout) waits for the compiled kernels to load
# rather than run the layer-by-layer path: loading them from numba's cache takes about 1 s of a core (up to 4 s
# loaded), the torch path runs B1 at ~35 G multiply-adds/s on 2 threads, 2.5× slower than the kernel, so from
# about 1.7 s of work on the torch path waiting pays (B1: 29,000 points of 512 samples).
WAIT_MACS = 5 * 10**10


class FusedMlpMetrics:
    """The packed layers of an MLP view, and its shared input's per-basis products for the batch in flight."""

    def __init__(self, layers: list[tuple[SubspaceLinear, bool]]):
        first, self.first_relu = layers[0]
        self.first_weight = first.stacked["weight"].detach()
        self.first_bias = _bias(first)
        rest = layers[1:]
        weights = [linear.stacked["weight"].detach().flatten(1) for linear, _ in rest]
        self.weights = torch.cat(weights, dim=1).contiguous()
        self.biases = torch.cat([_bias(linear) for linear, _ in rest], dim=1).contiguous()
        table, weight_at, bias_at = [], 0, 0
        for linear, relu in rest:
            table.append((weight_at, bias_at, linear.out_features, linear.in_features, int(relu)))
            weight_at += linear.out_features * linear.in_features
            bias_at += linear.out_features
        self.layers = torch.tensor(table, dtype=torch.int64)
        self.classes = rest[-1][0].out_features
        self.macs_per_row = sum(linear.in_features * linear.out_features for linear, _ in layers)
        self._first: tuple[tuple, Tensor] | None = None  # (batch key, Y [K, D1, N] feature-major)

    @classmethod
    def of(cls, view: SubspaceView, sums: MetricSums, device: torch.device) -> "FusedMlpMetrics | None":
        """The fused pass for `view` and metrics `sums`, or None where it does not apply (see the module doc)."""
        net = view.net
        if (device.type != "cpu" or view.state.plain or view.fallback_names or view.output is not None
                or not sums.takes_one_pass_only()
                or type(net) not in (nn.Sequential, FusedSequential)
                or any(has_forward_hooks(m) for m in net.modules())):
            return None
        layers: list[tuple[SubspaceLinear, bool]] = []
        for module in net:
            if type(module) is SubspaceLinear and module.stacked["weight"].dtype == torch.float32:
                layers.append((module, False))
            elif type(module) is nn.ReLU and layers and not layers[-1][1]:
                layers[-1] = (layers[-1][0], True)
            else:
                return None
        if (len(layers) < 2 or layers[-1][1] or not 0 < layers[-1][0].out_features < SMALL_CLASSES
                or any(linear.out_features > MAX_WIDTH for linear, _ in layers)):
            return None
        first = layers[0][0]
        if first.stacked["weight"].shape[0] >= first.in_features:  # K products of X cost more than mixing weights
            return None
        return cls(layers)

    def add(self, coeffs: Tensor, inputs: object, targets: Tensor, batch: Hashable, sums: MetricSums) -> bool:
        """Loss and error of every point of `coeffs` on this batch added to `sums`; False (nothing done) where the
        batch does not fit the kernel or the kernels are not loaded yet: the caller then runs the view."""
        if (not isinstance(inputs, Tensor) or inputs.dim() != 2 or inputs.dtype != torch.float32
                or inputs.shape[1] != self.first_weight.shape[2] or torch.is_grad_enabled()
                or not sums.one_pass_applies(self.classes, targets) or targets.shape[0] != inputs.shape[0]):
            return False
        kernels = compiled_cpu.kernels()
        if kernels is None and coeffs.shape[0] * inputs.shape[0] * self.macs_per_row >= WAIT_MACS:
            compiled_cpu.wait()  # a long call: load them now (a failed load returns None below)
            kernels = compiled_cpu.kernels()
        if kernels is None:
            return False
        first = self._first_outputs(inputs, batch)
        points = coeffs.shape[0]
        loss = torch.empty(points, dtype=torch.float64)
        wrong = torch.empty(points, dtype=torch.int64)
        kernels.use_threads(torch.get_num_threads())
        kernels.mlp_cross_entropy_sums(first.numpy(), self.first_relu, coeffs.float().contiguous().numpy(),
                                       self.weights.numpy(), self.biases.numpy(), self.layers.numpy(),
                                       targets.contiguous().numpy(), loss.numpy(), wrong.numpy())
        sums.add_one_pass(loss, wrong, targets, 0)
        return True

    def _first_outputs(self, inputs: Tensor, batch: Hashable) -> Tensor:
        """Y_k = X W1_kᵀ + b1_k for each basis member, [K, D1, N] (feature-major), kept for the batch."""
        key = (batch, inputs.data_ptr(), inputs._version, tuple(inputs.shape))
        if self._first is None or self._first[0] != key:
            products = torch.baddbmm(self.first_bias.unsqueeze(1), inputs.expand(self.first_weight.shape[0], -1, -1),
                                     self.first_weight.transpose(1, 2))
            self._first = (key, products.transpose(1, 2).contiguous())
        return self._first[1]


def _bias(linear: SubspaceLinear) -> Tensor:
    """The stacked bias [K, Dout], zeros for a Linear without one."""
    bias = linear.stacked.get("bias")
    weight = linear.stacked["weight"].detach()
    return bias.detach() if bias is not None else weight.new_zeros(weight.shape[0], weight.shape[1])
