"""Conv2d → BatchNorm2d → ReLU → MaxPool2d (BatchNorm and ReLU optional) of an nn.Sequential, run as one block.

In evaluation on CPU (no gradients recorded, small feature maps) the block keeps its activations channels-last,
so that nothing is transposed between the convolution, BatchNorm, ReLU and the pooling, and it pools before it
normalises:

- the convolution: for the input shared by all points (the first layer), K convolutions once per batch (one
  batched product of the input's patches with the K kernels where a patch is small, as for 1-channel images), then
  one product that mixes them straight into point-major channels-last [P, N, H, W, C]; otherwise one grouped
  convolution over points (groups = P·groups) on a channels-last [N, P·C, H, W] input (measured with torch 2.13
  on one core, 4 points of [128, 16, 4, 4] → 32 channels: 0.45 ms with the pooling, against 0.60 ms for the
  grouped convolution on contiguous NCHW with its transposes and 0.62 ms for a loop of per-point convolutions);
- BatchNorm's statistics (recomputation, or BatchNorm without running statistics) over the whole map; for the
  shared input, from the K outputs' means and covariances (once per batch): μ(p) = Σ_k c[p,k] m_k and
  σ²(p) = cᵀ Σ c per channel, without a pass over the points' outputs;
- then pooling first: for scale ≥ 0 the BatchNorm affine x · scale + shift is non-decreasing in x (so is its
  float rounding), as is ReLU, and a max commutes with non-decreasing functions: max-pooling before them gives
  the very same numbers, and they run on a map 4× smaller. Where some scale is negative BatchNorm runs first.

For the shared input with 2×2 pooling and scale ≥ 0, once the compiled CPU kernels are loaded (`compiled_cpu.py`),
the mix, pooling, affine map and ReLU run as one pass (`cpu_kernels.mix_pool_block`) straight into the output
(B3 on one core, in-process A/B, load 4.7: 29.6 against 33.9 ms a point); likewise, after a grouped convolution,
the pooling, affine map, ReLU and the move to point-major NCHW (`cpu_kernels.pool_block`).

The block returns contiguous NCHW [P·N, C, H', W'] as the layers would. Anywhere else (gradients, GPU, large
maps, padding modes other than zeros, the view's plain mode) it runs its layers one after another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import compiled_cpu
from ..ops_torch import conv_output_size
from .batchnorm import SubspaceBatchNorm
from .kept import KEPT_BYTES, KeptPerChunk
from .layers import SubspaceConv, has_forward_hooks
from .linear_block import LinearBlock, linear_block_at
from .pooling import SMALL_MAP, MaxPool2dFastCPU, is_plain_2x2, max_pool_2x2_channels_last


# Points mixed at a time from the shared input's K outputs, so that their maps stay in cache (B3 on one core,
# whole evaluation: groups of 2 to 8 points within noise of each other, 1 and 16 slower by 5-10 %).
POINT_GROUP = 4
# The shared input's K outputs come from one product of its patches where a patch holds at most this many numbers
# (C·kh·kw; B3's 1·3·3 on one core: 0.45 ms against 0.9-3 ms for the convolution; at 16·3·3 the convolution wins).
SMALL_PATCH = 32
# A block keeps the P combined kernels of its grouped convolution from batch to batch (per chunk of points) up to this
# size (`kept.py`).
KEPT_KERNEL_BYTES = KEPT_BYTES


@dataclass(frozen=True)
class SampleMajorMaps:
    """A ConvBlock's output handed to the next ConvBlock in the layout its grouped convolution reads: maps
    [N, P·C, H, W] channels-last, i.e. memory [N, H, W, P, C], for P points (never leaves a FusedSequential)."""

    maps: Tensor
    points: int

    def point_major(self) -> Tensor:
        """The same values as the layers pass them on: contiguous NCHW [P·N, C, H, W]."""
        return _points_nchw(self.maps, self.points, points_first=False)


class ConvBlock(nn.Module):
    """conv → [norm] → [relu] → pool, with the fast path above for evaluation on CPU."""

    def __init__(self, conv: SubspaceConv, norm: SubspaceBatchNorm | None, relu: nn.ReLU | None, pool: MaxPool2dFastCPU):
        super().__init__()
        self.conv, self.norm, self.relu, self.pool = conv, norm, relu, pool
        self.pool_2x2 = is_plain_2x2(pool.pool)
        # The shared input's K outputs with their means [K, C] and covariances [C, K, K], kept per batch.
        self._moments: tuple[Tensor, Tensor, Tensor] | None = None
        self.feeds_block = False  # the next step of its FusedSequential is a ConvBlock (set by `_fused_steps`)
        self._kept_values = KeptPerChunk()  # see `_kept`
        self._signs: tuple[Tensor, bool] | None = None  # see `scales_nonnegative`

    def forward(self, x: Tensor | SampleMajorMaps) -> Tensor | SampleMajorMaps:
        """The block's output: point-major NCHW [P·N, C, H', W'], or where `feeds_block` and a compiled kernel
        writes it, SampleMajorMaps for the next ConvBlock (which takes either)."""
        handed = isinstance(x, SampleMajorMaps)
        if not self._fast(x.maps if handed else x):
            return self._plain(x.point_major() if handed else x)
        state = self.conv.state
        points, coeffs = state.points, state.coeffs
        per_basis = None if handed else self._per_basis_outputs(x)
        if per_basis is None:
            y = self._grouped_convolution(x)
            values = _values(y, points, points_first=False)
            scale, shift = self._affine(lambda: _statistics(values), values.shape[0] * values.shape[2])
            if state.metric_tail is not None:  # may end the forward with the metrics (`conv_metrics.py`)
                state.metric_tail.run(self, y, scale, shift)
            compiled = self._compiled_pool(y, scale, shift, points)
            if compiled is not None:
                return compiled
            return _points_nchw(self._pooled(y, scale, shift, points, points_first=False), points, points_first=False)
        samples = per_basis.shape[1]
        scale, shift = self._affine(lambda: _mixed_statistics(*self._moments_of(per_basis), coeffs),
                                    samples * per_basis.shape[2] * per_basis.shape[3])
        compiled = self._compiled_mix_pool(per_basis, coeffs, scale, shift)
        if compiled is not None:
            return compiled
        out = None
        for start in range(0, points, POINT_GROUP):  # point-major: each group's rows of the output in turn
            group = slice(start, min(start + POINT_GROUP, points))
            y = ops.mix(coeffs[group].to(per_basis.dtype), per_basis)  # [G, N, H, W, C]
            y = y.reshape(-1, *y.shape[2:]).permute(0, 3, 1, 2)  # channels-last [G·N, C, H, W]
            pooled = self._pooled(y, None if scale is None else scale[group], None if shift is None else shift[group],
                                  group.stop - start, points_first=True)
            if out is None:
                out = pooled.new_empty(points * samples, *pooled.shape[1:])
            out[start * samples:group.stop * samples] = pooled
        return out

    def _compiled_mix_pool(self, per_basis: Tensor, coeffs: Tensor, scale: Tensor | None, shift: Tensor | None
                           ) -> Tensor | SampleMajorMaps | None:
        """The mix, pooling, BatchNorm and ReLU of the shared input's K outputs in one compiled pass
        (`cpu_kernels.mix_pool_block`, or `mix_of_three_pool_block` for three members into sample-major maps; loaded
        by `compiled_cpu`) where it applies: float32, 2×2 pooling, scale ≥ 0. None elsewhere, or before the kernels
        are loaded."""
        if not (self.pool_2x2 and per_basis.dtype == torch.float32 and coeffs.dtype == torch.float32
                and (scale is None or self.scales_nonnegative(scale))):
            return None
        bases, samples, height, width, channels = per_basis.shape
        kernels = compiled_cpu.kernels()
        if kernels is None:
            return None
        scale, shift = self.scale_shift_or_identity(scale, shift, coeffs.shape[0], channels, per_basis)
        out, target = self._output(coeffs.shape[0], samples, channels, height // 2, width // 2, per_basis)
        arguments = (per_basis.numpy(), coeffs.numpy(), scale.numpy(), shift.numpy(), self.relu is not None)
        kernels.use_threads(torch.get_num_threads())
        if bases == 3 and self.feeds_block:  # target views contiguous sample-major memory [N, H', W', P, C]
            kernels.mix_of_three_pool_block(*arguments, target.permute(1, 3, 4, 0, 2).numpy())
        else:
            kernels.mix_pool_block(*arguments, target.numpy())
        return out

    def _compiled_pool(self, y: Tensor, scale: Tensor | None, shift: Tensor | None, points: int
                       ) -> Tensor | SampleMajorMaps | None:
        """Pooling, BatchNorm and ReLU of a grouped convolution's channels-last, sample-major output [N, P·C, H, W]
        into point-major NCHW in one compiled pass (`cpu_kernels.pool_block`) where it applies (as
        `_compiled_mix_pool`); else None."""
        maps = y.permute(0, 2, 3, 1)
        if not (self.pool_2x2 and y.dtype == torch.float32 and maps.is_contiguous()
                and (scale is None or self.scales_nonnegative(scale))):
            return None
        samples, height, width, point_channels = maps.shape
        kernels = compiled_cpu.kernels()
        if kernels is None:
            return None
        scale, shift = self.scale_shift_or_identity(scale, shift, points, point_channels // points, y)
        out, target = self._output(points, samples, point_channels // points, height // 2, width // 2, y)
        kernels.use_threads(torch.get_num_threads())
        kernels.pool_block(maps.numpy(), scale.numpy(), shift.numpy(), self.relu is not None, target.numpy())
        return out

    def _output(self, points: int, samples: int, channels: int, height: int, width: int, like: Tensor
                ) -> tuple[Tensor | SampleMajorMaps, Tensor]:
        """A compiled kernel's output and the [P, N, C, H, W] view of it the kernel writes: SampleMajorMaps where
        the next step is a ConvBlock (its grouped convolution reads that layout, no transpose between them), else
        point-major NCHW [P·N, C, H, W]."""
        if self.feeds_block:
            memory = like.new_empty(samples, height, width, points, channels)
            maps = memory.reshape(samples, height, width, points * channels).permute(0, 3, 1, 2)
            return SampleMajorMaps(maps, points), memory.permute(3, 0, 4, 1, 2)
        out = like.new_empty(points * samples, channels, height, width)
        return out, out.reshape(points, samples, channels, height, width)

    @staticmethod
    def scale_shift_or_identity(scale: Tensor | None, shift: Tensor | None, points: int, channels: int,
                                like: Tensor) -> tuple[Tensor, Tensor]:
        """float32 scale and shift [P, C] for the kernels: ones and zeros without BatchNorm."""
        if scale is None or shift is None:
            return like.new_ones(points, channels), like.new_zeros(points, channels)
        return scale.float(), shift.float()

    def _plain(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.norm is not None:
            y = self.norm(y)
        if self.relu is not None:
            y = self.relu(y)
        return self.pool(y)

    def _fast(self, x: Tensor) -> bool:
        conv, state = self.conv, self.conv.state
        weight = conv.stacked["weight"]
        if (torch.is_grad_enabled() or state.plain or x.device.type != "cpu" or x.dim() != 4 or weight.dim() != 5
                or conv.pre_padding is not None or state.bn_phase == "batch"):
            return False
        if conv.padding == "same":
            out = list(x.shape[2:])
        else:
            padding = (0, 0) if conv.padding == "valid" else conv.padding
            out = conv_output_size(x.shape[2:], weight.shape[3:], conv.stride, padding, conv.dilation)
        return out[0] * out[1] <= SMALL_MAP

    def _affine(self, batch_statistics: Callable[[], tuple[Tensor, Tensor]], per_channel: int
                ) -> tuple[Tensor | None, Tensor | None]:
        """BatchNorm's scale and shift [P, C] for the points in flight, (None, None) without BatchNorm; kept from
        batch to batch where they do not depend on the batch (the stored or the recomputed statistics)."""
        norm = self.norm
        if norm is None:
            return None, None
        affine = lambda: norm.scale_shift(*norm.statistics(batch_statistics, per_channel))
        phase = self.conv.state.bn_phase
        if not norm.tracks_statistics or phase not in ("stored", "recomputed"):
            return affine()
        return self._kept("affine", norm.recomputed or () if phase == "recomputed" else (), affine)

    def _kept(self, name: str, tensors: tuple[Tensor, ...], make: Callable[[], Any]) -> Any:
        """make(), a function of the points in flight, the block's stacked tensors and `tensors` only, kept per chunk
        of points (`kept.py`)."""
        held = (*tensors, *self.conv.stacked.values(), *(() if self.norm is None else self.norm.stacked.values()))
        return self._kept_values.get_or_make(name, self.conv.state, held, make)

    def scales_nonnegative(self, scale: Tensor) -> bool:
        """Whether every BatchNorm scale is ≥ 0 (pooling may then run first), remembered for the last scales seen."""
        if self._signs is None or self._signs[0] is not scale:
            self._signs = (scale, bool((scale >= 0).all()))
        return self._signs[1]

    def _pooled(self, y: Tensor, scale: Tensor | None, shift: Tensor | None, points: int, points_first: bool) -> Tensor:
        """pool(relu(y · scale + shift)) of a channels-last map, pooling first where that gives the same numbers."""
        if scale is not None and not self.scales_nonnegative(scale):  # pooling does not commute with a decreasing map
            y = _affine_map(y, scale, shift, points, points_first)
            scale = shift = None
        y = max_pool_2x2_channels_last(y) if self.pool_2x2 else self.pool.pool(y)
        if scale is not None:
            y = _affine_map(y, scale, shift, points, points_first)
        return torch.relu_(y) if self.relu is not None else y  # y is this block's own

    def _per_basis_outputs(self, x: Tensor) -> Tensor | None:
        """For the input shared by all points, where K convolutions cost less than P: the K outputs [K, N, H, W, C]
        (kept per batch), else None."""
        conv, state = self.conv, self.conv.state
        shared = state.shared_rows(x)
        if shared is None or not conv.per_basis_is_cheaper():
            return None
        weight, bias, rows = conv.stacked["weight"], conv.stacked.get("bias"), shared[1]
        if conv.groups == 1 and not isinstance(conv.padding, str) and weight[0, 0].numel() <= SMALL_PATCH:
            return conv.per_basis_outputs(
                shared, lambda eye: _per_basis_by_patches(rows, weight, bias, conv.stride, conv.padding, conv.dilation),
                layout="channels_last")
        options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        return conv.per_basis_outputs(
            shared, lambda eye: ops.combined_conv(rows, weight, bias, eye, **options).permute(0, 1, 3, 4, 2).contiguous(),
            layout="channels_last")

    def _moments_of(self, per_basis: Tensor) -> tuple[Tensor, Tensor]:
        if self._moments is None or self._moments[0] is not per_basis:
            self._moments = (per_basis, *_moments(per_basis))
        return self._moments[1], self._moments[2]

    def _grouped_convolution(self, x: Tensor | SampleMajorMaps) -> Tensor:
        """One convolution grouped over points: channels-last, sample-major [N, P·C, H, W]."""
        conv, state = self.conv, self.conv.state
        weight, bias = conv.stacked["weight"], conv.stacked.get("bias")
        points, coeffs = state.points, state.coeffs
        if isinstance(x, SampleMajorMaps):
            grouped = x.maps
        else:
            shared = state.shared_rows(x)
            x_points = shared[1].expand(points, *shared[1].shape) if shared is not None else state.per_point(x)
            _, samples, channels, height, width = x_points.shape
            grouped = x_points.permute(1, 3, 4, 0, 2).reshape(samples, height, width, points * channels).permute(0, 3, 1, 2)
        combined = lambda: _grouped_kernels(coeffs, weight, bias)
        small = points * weight[0].numel() * weight.element_size() <= KEPT_KERNEL_BYTES
        w, b = self._kept("grouped kernels", (), combined) if small else combined()
        return F.conv2d(grouped.contiguous(memory_format=torch.channels_last), w, b, conv.stride, conv.padding,
                        conv.dilation, points * conv.groups)


def _grouped_kernels(coeffs: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The P combined kernels stacked for a convolution grouped over points (channels-last) and their biases."""
    w = ops.mix(coeffs.to(weight.dtype), weight)
    w = w.reshape(-1, *w.shape[2:]).contiguous(memory_format=torch.channels_last)
    return w, None if bias is None else ops.mix(coeffs.to(bias.dtype), bias).reshape(-1)


def _per_basis_by_patches(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
                          padding: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Y_k = conv(x, W_k) + b_k of x [N, C, H, W] (groups 1) as one batched product of its patches [N·H'·W', C·kh·kw]
    with the K kernels: [K, N, H', W', Cout], channels-last without a transpose."""
    bases, out_channels = weight.shape[:2]
    height, width = conv_output_size(x.shape[2:], weight.shape[3:], stride, padding, dilation)
    patches = _patches(x, weight.shape[3:], stride, padding, dilation, height, width)  # [N·H'·W', C·kh·kw]
    kernels = weight.reshape(bases, out_channels, -1).transpose(1, 2)  # [K, C·kh·kw, Cout]
    patches = patches.expand(bases, *patches.shape)
    y = torch.bmm(patches, kernels) if bias is None else torch.baddbmm(bias[:, None, :], patches, kernels)
    return y.reshape(bases, x.shape[0], height, width, out_channels)


def _patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...], height: int, width: int) -> Tensor:
    """The rows of `F.unfold(x, ...)` transposed, [N·H'·W', C·kh·kw] (C major, as unfold orders them), written at
    once by stacking kh·kw shifted views of the zero-padded channels-last x (B3's [128, 1, 8, 8] with 3×3 kernels on
    one core: 0.16 ms against 0.35 ms for unfold and the copy of its transpose)."""
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])).permute(0, 2, 3, 1)  # [N, H+2p, W+2p, C]
    shifted = [padded[:, i * dilation[0]: i * dilation[0] + stride[0] * (height - 1) + 1: stride[0],
                      j * dilation[1]: j * dilation[1] + stride[1] * (width - 1) + 1: stride[1]]
               for i in range(kernel[0]) for j in range(kernel[1])]  # each [N, H', W', C]
    return torch.stack(shifted, dim=-1).reshape(-1, x.shape[1] * kernel[0] * kernel[1])


def _affine_map(y: Tensor, scale: Tensor, shift: Tensor, points: int, points_first: bool) -> Tensor:
    """y · scale + shift per point and channel (scale, shift [P, C]) of a channels-last map, as BatchNorm computes it."""
    values = _values(y, points, points_first)
    return _from_values(torch.addcmul(shift[:, None, :], values, scale[:, None, :]), y.shape)


def _values(y: Tensor, points: int, points_first: bool) -> Tensor:
    """A 4-d map as [A, P, B, C] (C the channels of one point, A·B the values per point and channel): a view of
    channels-last memory."""
    channels_last = y.permute(0, 2, 3, 1)  # [rows, H, W, channels]
    if points_first:
        return channels_last.reshape(1, points, -1, y.shape[1])
    return channels_last.reshape(-1, points, 1, y.shape[1] // points)


def _from_values(values: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `_values`: the 4-d map of that shape (channels-last) holding `values`."""
    rows, channels, height, width = shape
    return values.reshape(rows, height, width, channels).permute(0, 3, 1, 2)


def _points_nchw(y: Tensor, points: int, points_first: bool) -> Tensor:
    """[P·N, C, H, W] contiguous, as the view's layers pass activations on."""
    if points_first:
        return y.contiguous()
    samples, channels, height, width = y.shape
    return y.reshape(samples, points, channels // points, height, width).transpose(0, 1).reshape(
        -1, channels // points, height, width)


def _statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per point and channel, the mean and biased variance of [A, P, B, C] over A and B: [P, C] each. Two passes
    (mean, then mean squared deviation), as BatchNorm's; several times faster on CPU than torch.var_mean here, and
    one compiled pass each (`cpu_kernels.column_statistics`, float64 sums) for float32 [A, P, 1, C] of contiguous
    rows, once the kernels are loaded."""
    if values.shape[2] == 1 and values.dtype == torch.float32:
        rows = values.reshape(values.shape[0], -1)
        kernels = compiled_cpu.kernels() if rows.stride(1) == 1 and rows.stride(0) == rows.shape[1] else None
        if kernels is not None:
            mean, var = rows.new_empty(rows.shape[1]), rows.new_empty(rows.shape[1])
            kernels.use_threads(torch.get_num_threads())
            kernels.column_statistics(rows.numpy(), mean.numpy(), var.numpy())
            return mean.reshape(values.shape[1], -1), var.reshape(values.shape[1], -1)
    mean = values.mean(dim=(0, 2), keepdim=True)
    var = (values - mean).square_().mean(dim=(0, 2))
    return mean[0, :, 0], var


def _moments(per_basis: Tensor) -> tuple[Tensor, Tensor]:
    """Means [K, C] and covariances [C, K, K] (float64, over samples and positions) of K outputs [K, N, H, W, C]
    (by `cpu_kernels.moments` for contiguous float32 ones once the kernels are loaded)."""
    bases = per_basis.shape[0]
    if per_basis.dtype == torch.float32 and per_basis.is_contiguous():
        kernels = compiled_cpu.kernels()
        if kernels is not None:
            mean = torch.empty(bases, per_basis.shape[-1], dtype=torch.float64)
            covariance = torch.empty(per_basis.shape[-1], bases, bases, dtype=torch.float64)
            kernels.moments(per_basis.reshape(bases, -1, per_basis.shape[-1]).numpy(), mean.numpy(), covariance.numpy())
            return mean, covariance
    centred = per_basis.reshape(bases, -1, per_basis.shape[-1]).double()  # [K, M, C], a copy
    mean = centred.mean(dim=1)
    centred.sub_(mean[:, None])
    covariance = centred.new_empty(per_basis.shape[-1], bases, bases)
    # One product per pair (k, l): several times faster on CPU than an einsum over [K, M, C] (B3: 0.9 ms vs 4.7 ms).
    for k in range(bases):
        for l in range(k + 1):
            covariance[:, k, l] = covariance[:, l, k] = (centred[k] * centred[l]).sum(dim=0)
    return mean, covariance / centred.shape[1]


def _mixed_statistics(mean: Tensor, covariance: Tensor, coeffs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance [P, C] of y[p] = Σ_k c[p,k] Y_k from the moments of the Y_k: μ = c·m,
    σ² = cᵀ Σ c per channel (exact in exact arithmetic, accumulated in float64; no pass over the P mixed outputs)."""
    c = coeffs.double()
    pairs = (c[:, :, None] * c[:, None, :]).reshape(c.shape[0], -1)  # c[p,k] c[p,l]: [P, K·K]
    var = (pairs @ covariance.reshape(covariance.shape[0], -1).T).clamp_min_(0)  # one product (an einsum: 1.6× longer)
    return (c @ mean).to(coeffs.dtype), var.to(coeffs.dtype)


class FusedSequential(nn.Sequential):
    """A converted nn.Sequential whose own forward runs each SubspaceConv (2-d) → [SubspaceBatchNorm] → [ReLU] →
    MaxPool2dFastCPU run of its children as one ConvBlock, and each run SubspaceLinear → [ReLU] → … of them as one
    LinearBlock (`linear_block.py`).

    Its children stay the layers themselves: a model that iterates over it, indexes it or slices it (e.g. to
    keep the activation before a pooling as a skip connection) gets every layer's own output."""

    @property
    def steps(self) -> list[nn.Module]:
        """What the forward runs: the children, each conv → [norm] → [relu] → pool run as one ConvBlock, each
        linear → [relu] → … run as one LinearBlock."""
        modules = tuple(self._modules.values())
        if getattr(self, "_planned_for", None) != modules:  # a slice of it, or children added or replaced
            object.__setattr__(self, "_steps", _fused_steps(list(modules)))  # not submodules: no new names
            object.__setattr__(self, "_planned_for", modules)
        return self._steps

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x


def fuse_blocks(sequence: nn.Sequential) -> nn.Sequential:
    """`sequence` as a FusedSequential where it holds a conv → [norm] → [relu] → pool run or a linear block,
    else unchanged."""
    modules = tuple(sequence._modules.values())
    steps = _fused_steps(list(modules))
    if not any(isinstance(step, (ConvBlock, LinearBlock)) for step in steps):
        return sequence
    sequence.__class__ = FusedSequential  # in place: the same children, names, hooks and attributes
    # Planned now, while only the model's own hooks are on its layers (the chunk planner adds some for a while).
    object.__setattr__(sequence, "_steps", steps)
    object.__setattr__(sequence, "_planned_for", modules)
    return sequence


def _fused_steps(modules: list[nn.Module]) -> list[nn.Module]:
    """`modules` with each conv → [norm] → [relu] → pool run replaced by one ConvBlock of those layers, and each
    run of linear layers (with ReLUs) by one LinearBlock."""
    steps, i = [], 0
    while i < len(modules):
        conv = modules[i]
        if isinstance(conv, SubspaceConv) and conv.stacked["weight"].dim() == 5:
            j = i + 1
            norm = modules[j] if j < len(modules) and isinstance(modules[j], SubspaceBatchNorm) else None
            j += norm is not None
            relu = (modules[j] if j < len(modules) and type(modules[j]) is nn.ReLU and not has_forward_hooks(modules[j])
                    else None)
            j += relu is not None
            if j < len(modules) and isinstance(modules[j], MaxPool2dFastCPU):
                steps.append(ConvBlock(conv, norm, relu, modules[j]))
                i = j + 1
                continue
        if (block := linear_block_at(modules, i)) is not None:
            steps.append(block[0])
            i = block[1]
            continue
        steps.append(conv)
        i += 1
    for step, following in zip(steps, steps[1:] + [None]):
        if isinstance(step, ConvBlock):
            step.feeds_block = isinstance(following, ConvBlock)
    return steps
