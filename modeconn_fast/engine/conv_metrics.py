"""The last conv block of a CNN, its Flatten and Linear logits, and their loss and error in one compiled pass (CPU,
evaluation).

For a view whose model is an nn.Sequential ending in conv → [BatchNorm] → [ReLU] → 2×2 max-pool (a ConvBlock),
nn.Flatten() and a Linear with fewer than `metrics.SMALL_CLASSES` outputs, evaluated for loss and error only with the
default cross-entropy, where the block's input differs per point (one convolution grouped over points, e.g. after
another block), `cpu_kernels.pool_linear_cross_entropy_sums` takes the block's convolution output straight to the
metrics:

    h(p) = flatten(relu(pool(y(p)) · scale(p) + shift(p))),   logits(p) = h(p) W(p)ᵀ + b(p),
    loss(p), wrong(p) as `cpu_kernels.cross_entropy_sums` of the logits,

a block of samples at a time in cache, where the layer-by-layer path writes the pooled maps, the logits and the
per-point losses to memory and runs the Linear and the metric as separate passes with their Python around them (B3:
pooling, Linear and metrics took about 12 % of an evaluation on one thread). The forward stops there by raising
`MetricsDone` (as BatchNorm's recomputation stops with `CollectionDone`). Anywhere the block's compiled pooling does
not apply (negative BatchNorm scales, kernels not loaded, other dtypes) the forward runs on and the metrics come from
its logits; `evaluate(..., fast=False)` never takes it.
"""
from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor, nn

from .. import ops
from . import compiled_cpu
from .conv_block import ConvBlock, FusedSequential
from .kept import KeptPerChunk
from .layers import SubspaceLinear, has_forward_hooks
from .metrics import SMALL_CLASSES, MetricSums
from .view import SubspaceView


class MetricsDone(Exception):
    """Raised by the last ConvBlock once `ConvMetrics` has the loss and error of the points in flight."""


class ConvMetrics:
    """The view's last ConvBlock and Linear, and the loss sums and wrong counts of the last batch it ran."""

    def __init__(self, block: ConvBlock, linear: SubspaceLinear):
        self.block, self.linear = block, linear
        self.classes = linear.out_features
        self.targets: Tensor | None = None
        self._kept = KeptPerChunk()  # the logit weights of each chunk of points, from batch to batch
        self.loss = torch.empty(0, dtype=torch.float64)
        self.wrong = torch.empty(0, dtype=torch.int64)

    @classmethod
    def of(cls, view: SubspaceView, sums: MetricSums, device: torch.device) -> "ConvMetrics | None":
        """The fused tail for `view` and metrics `sums`, or None where it does not apply (see the module doc)."""
        net = view.net
        if (device.type != "cpu" or view.state.plain or view.fallback_names or view.output is not None
                or not sums.takes_one_pass_only() or type(net) is not FusedSequential
                or any(has_forward_hooks(m) for m in net.modules())):
            return None
        steps = net.steps
        if len(steps) < 3:
            return None
        block, flatten, linear = steps[-3:]
        if not (isinstance(block, ConvBlock) and block.pool_2x2 and type(flatten) is nn.Flatten
                and flatten.start_dim == 1 and flatten.end_dim == -1 and type(linear) is SubspaceLinear
                and 0 < linear.out_features < SMALL_CLASSES and linear.stacked["weight"].dtype == torch.float32):
            return None
        return cls(block, linear)

    def add(self, view: SubspaceView, coeffs: Tensor, inputs: object, targets: Tensor, offset: int, batch: Hashable,
            sums: MetricSums) -> None:
        """Loss and error of the points `coeffs` (points offset … of the evaluation) on this batch, added to `sums`:
        through the compiled tail where the block takes it, else from the view's logits."""
        state = view.state
        if sums.one_pass_applies(self.classes, targets):
            self.targets = targets
            state.metric_tail = self
        try:
            outputs = view(coeffs, inputs, offset=offset, batch=batch)
        except MetricsDone:
            sums.add_one_pass(self.loss, self.wrong, targets, offset)
            return
        finally:
            state.metric_tail = None
            self.targets = None
        sums.add(outputs, targets, offset)

    def run(self, block: ConvBlock, y: Tensor, scale: Tensor | None, shift: Tensor | None) -> None:
        """Called by `block` with its grouped convolution's output y (channels-last [N, P·C, H, W]) and BatchNorm's
        scale and shift [P, C] (None without BatchNorm): raises MetricsDone with the loss and error in `loss` and
        `wrong` where the compiled tail applies, else returns (the block goes on)."""
        maps = y.permute(0, 2, 3, 1)
        targets = self.targets
        state = block.conv.state
        points = state.points
        samples, height, width, point_channels = maps.shape
        if (block is not self.block or targets is None or y.dtype != torch.float32 or not maps.is_contiguous()
                or samples != targets.shape[0] or (scale is not None and not block.scales_nonnegative(scale))
                or self.linear.in_features != point_channels // points * (height // 2) * (width // 2)):
            return
        kernels = compiled_cpu.kernels()
        if kernels is None:
            return
        scale, shift = block.scale_shift_or_identity(scale, shift, points, point_channels // points, y)
        weights, biases = self._kept.get_or_make("logit weights", state, tuple(self.linear.stacked.values()),
                                                 lambda: self._logit_weights(state.coeffs, height // 2, width // 2))
        self.loss = torch.empty(points, dtype=torch.float64)
        self.wrong = torch.empty(points, dtype=torch.int64)
        kernels.use_threads(torch.get_num_threads())
        kernels.pool_linear_cross_entropy_sums(maps.numpy(), scale.contiguous().numpy(), shift.contiguous().numpy(),
                                               block.relu is not None, weights.numpy(), biases.numpy(),
                                               targets.contiguous().numpy(), self.loss.numpy(), self.wrong.numpy())
        raise MetricsDone

    def _logit_weights(self, coeffs: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The Linear's weights [P, classes, H·W·C] at the points, their inputs in the kernel's order (i, j, c) rather
        than Flatten's (c, i, j), and its biases [P, classes] (zeros without bias)."""
        weight, bias = self.linear.stacked["weight"], self.linear.stacked.get("bias")
        points = coeffs.shape[0]
        mixed = ops.mix(coeffs.to(weight.dtype), weight).reshape(points, self.classes, -1, height, width)
        weights = mixed.permute(0, 1, 3, 4, 2).reshape(points, self.classes, -1).contiguous()
        biases = (ops.mix(coeffs.to(bias.dtype), bias).contiguous() if bias is not None
                  else weights.new_zeros(points, self.classes))
        return weights, biases
