"""BatchNorm in a subspace view, with per-point statistics.

Running statistics of two independently trained models do not interpolate (Garipov et al. 2018), so the
engine offers two modes (DESIGN §2):

- "recompute": one pass over `bn_data` in train mode gives every point its own statistics, all points at
  once. As the reference code's `update_bn` does (running statistics reset, momentum b/(n+b) for a batch of
  b after n samples), the result is the sample-weighted average of the batch means and of the unbiased batch
  variances: μ = Σ_i b_i μ_i / Σ_i b_i, σ² = Σ_i b_i σ²_i / Σ_i b_i. While collecting, each point's batch
  is normalised with its own biased batch statistics, exactly as in train mode.
- "eval": each point mixes the stored statistics of the basis members: μ(p) = Σ_k c[p,k] μ_k (likewise σ²).
  Exact at the members themselves, only sound for points close to them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import SubspaceLayer
from .state import ViewState


class SubspaceBatchNorm(SubspaceLayer):
    """BatchNorm1d / BatchNorm2d on inputs [P·N, C, *spatial] with per-point statistics and affine parameters."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.modules.batchnorm._BatchNorm):
        super().__init__(state, stacked)
        self.eps = module.eps
        self.tracks_statistics = module.track_running_stats
        self.recomputed: tuple[Tensor, Tensor] | None = None  # (mean, var) [P, C] from the last collection
        self._sums: tuple[Tensor, Tensor] | None = None
        self._samples = 0

    def start_collection(self) -> None:
        self._sums, self._samples, self.recomputed = None, 0, None

    def finish_collection(self) -> None:
        if self._sums is None:
            raise ValueError("bn_data gave no batch reaching this BatchNorm layer: it is empty")
        mean_sum, var_sum = self._sums
        self.recomputed = (mean_sum / self._samples, var_sum / self._samples)
        self._sums = None

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        channels = x.shape[1]
        values = state.unfold(x).reshape(state.points, state.samples, channels, -1)  # [P, N, C, S]
        phase = state.bn_phase
        if phase == "collect" or not self.tracks_statistics:
            var, mean = torch.var_mean(values, dim=(1, 3), correction=0)
            if phase == "collect" and self.tracks_statistics:
                self._accumulate(mean, var, per_channel=values.shape[1] * values.shape[3])
        elif phase == "recomputed":
            if self.recomputed is None:
                raise RuntimeError("BatchNorm statistics were not recomputed for these points")
            mean, var = self.recomputed
        else:
            mean, var = self.mixed("running_mean"), self.mixed("running_var")
        scale = torch.rsqrt(var + self.eps)
        weight, bias = self.mixed("weight"), self.mixed("bias")
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        y = torch.addcmul(shift[:, None, :, None], values, scale[:, None, :, None])
        return y.reshape(x.shape)

    def _accumulate(self, mean: Tensor, var: Tensor, per_channel: int) -> None:
        if per_channel < 2:
            raise ValueError("recomputing BatchNorm statistics needs more than one value per channel in each "
                             "bn_data batch: use larger batches")
        batch = self.state.samples
        unbiased = var * (per_channel / (per_channel - 1))
        if self._sums is None:
            self._sums = (mean * batch, unbiased * batch)
        else:
            self._sums = (self._sums[0] + mean * batch, self._sums[1] + unbiased * batch)
        self._samples += batch
