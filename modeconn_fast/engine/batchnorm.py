"""BatchNorm in a subspace view, with per-point statistics.

Running statistics of two independently trained models do not interpolate (Garipov et al. 2018), so the
engine offers two modes (DESIGN §2):

- "recompute": one pass over `bn_data` in train mode gives every point its own statistics, all points at
  once. As the reference code's `update_bn` does (running statistics reset, momentum b/(n+b) for a batch of
  b after n samples), the result is the sample-weighted average of the batch means and of the unbiased batch
  variances: μ = Σ_i b_i μ_i / Σ_i b_i, σ² = Σ_i b_i σ²_i / Σ_i b_i. While collecting, each point's batch
  is normalised with its own biased batch statistics, exactly as in train mode.
- training ("batch" phase): each point's minibatch is normalised with its own batch statistics, as in train
  mode, and nothing is accumulated (a curve's running statistics mean nothing; they are recomputed afterwards).
- "eval": each point mixes the stored statistics of the basis members: μ(p) = Σ_k c[p,k] μ_k (likewise σ²).
  Exact at the members themselves, only sound for points close to them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SubspaceLayer
from .state import ViewState


class SubspaceBatchNorm(SubspaceLayer):
    """BatchNorm1d / BatchNorm2d on inputs [P·N, C, *spatial] with per-point statistics and affine parameters."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.modules.batchnorm._BatchNorm):
        super().__init__(state, stacked)
        self.eps = module.eps
        self.tracks_statistics = module.track_running_stats
        self.recomputed: tuple[Tensor, Tensor] | None = None  # (mean, var) [all points, C] from the last collection
        self._sums: tuple[Tensor, Tensor] | None = None  # Σ b_i μ_i, Σ b_i σ²_i per point and channel
        self._samples: Tensor | None = None  # Σ b_i per point

    def start_collection(self, points: int) -> None:
        """Statistics for `points` points will be accumulated, chunk by chunk, batch by batch, in any order
        (each chunk adds to its own rows)."""
        self.recomputed = None
        if self.tracks_statistics:
            like = self.stacked["running_mean"]
            self._sums = (like.new_zeros(points, like.shape[1]), like.new_zeros(points, like.shape[1]))
            self._samples = like.new_zeros(points)

    def finish_collection(self) -> None:
        if not self.tracks_statistics:  # such a layer always normalises with its batch's statistics
            return
        if self._sums is None or self._samples is None or bool((self._samples == 0).any()):
            raise ValueError("bn_data gave no batch reaching this BatchNorm layer for some points: is it empty?")
        mean_sum, var_sum = self._sums
        samples = self._samples.unsqueeze(1)
        self.recomputed = (mean_sum / samples, var_sum / samples)
        self._sums = self._samples = None

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        if state.bn_phase == "batch":
            return self._batch_normalised(x)
        channels = x.shape[1]
        values = x.reshape(state.points, -1, channels, x[0, 0].numel())  # [P, M, C, S]: M = N (or N·positions)
        mean, var = self.statistics(lambda: _batch_statistics(values), per_channel=values.shape[1] * values.shape[3])
        scale, shift = self.scale_shift(mean, var)
        y = torch.addcmul(shift[:, None, :, None], values, scale[:, None, :, None])
        return y.reshape(x.shape)

    def statistics(self, batch_statistics: Callable[[], tuple[Tensor, Tensor]], per_channel: int) -> tuple[Tensor, Tensor]:
        """(mean, variance) [P, C] that the points in flight normalise with, in every phase but "batch":
        `batch_statistics()` (mean, biased variance of this batch, accumulated while collecting) where the phase
        or the layer asks for them, else the recomputed or the mixed stored ones. per_channel: values per point
        and channel in this batch."""
        state = self.state
        phase = state.bn_phase
        if phase == "collect" or not self.tracks_statistics:
            mean, var = batch_statistics()
            if phase == "collect" and self.tracks_statistics:
                self._accumulate(mean, var, per_channel)
            return mean, var
        if phase == "recomputed":
            if self.recomputed is None:
                raise RuntimeError("BatchNorm statistics were not recomputed for these points")
            return self.recomputed[0][state.where], self.recomputed[1][state.where]
        return self.mixed("running_mean"), self.mixed("running_var")

    def scale_shift(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """y = x · scale + shift per point and channel: scale = γ / √(σ² + ε), shift = β − μ · scale."""
        scale = torch.rsqrt(var + self.eps)
        weight, bias = self.mixed("weight"), self.mixed("bias")
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale, shift

    def _batch_normalised(self, x: Tensor) -> Tensor:
        """Each point's batch normalised with its own (biased) batch statistics, by torch's fused batch_norm:
        the points become channel groups of one [M, P·C, S] tensor (one point needs no rearranging)."""
        points, channels = self.state.points, x.shape[1]
        weight, bias = self.mixed("weight"), self.mixed("bias")
        weight = None if weight is None else weight.reshape(-1)
        bias = None if bias is None else bias.reshape(-1)
        if points == 1:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        values = x.reshape(points, -1, channels, x[0, 0].numel()).transpose(0, 1)  # [M, P, C, S]
        y = F.batch_norm(values.reshape(values.shape[0], points * channels, -1), None, None, weight, bias, True, 0.0,
                         self.eps)
        return y.reshape(values.shape).transpose(0, 1).reshape(x.shape)

    def _accumulate(self, mean: Tensor, var: Tensor, per_channel: int) -> None:
        if per_channel < 2:
            raise ValueError("recomputing BatchNorm statistics needs more than one value per channel in each "
                             "bn_data batch: use larger batches")
        state = self.state
        self._sums[0][state.where].add_(mean, alpha=state.samples)
        self._sums[1][state.where].add_(var, alpha=state.samples * per_channel / (per_channel - 1))  # unbiased
        self._samples[state.where] += state.samples
        state.collected += 1
        if state.collected == state.collections_per_forward:
            raise CollectionDone  # nothing after the last statistics matters to the recomputation


class CollectionDone(Exception):
    """Raised by the last BatchNorm layer of a recomputation pass once its statistics are accumulated: the view
    stops the forward there (the layers after it would only compute outputs nobody reads)."""


def _batch_statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per point and channel, the mean and biased variance over samples and positions of [P, N, C, S].

    Two passes (mean, then mean squared deviation), each reducing the contiguous last axis first: several
    times faster on CPU than one reduction over the axes (1, 3) together.
    """
    mean = values.mean(dim=3).mean(dim=1)
    deviation = values - mean[:, None, :, None]
    squares = deviation.square() if deviation.requires_grad else deviation.square_()
    return mean, squares.mean(dim=3).mean(dim=1)
