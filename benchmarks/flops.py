"""FLOPs of one point of a network, counted from its layers' shapes (for the benchmark table's floor column).

One forward of a single sample records, in call order, the multiply-adds of every Conv1d/Conv2d
(Cout · Cin/groups · kernel size · output positions) and Linear (in · out · rows) and where each BatchNorm runs.
Counted ×2 as FLOPs, as `plane.flops_per_point` does; element-wise work (BatchNorm's affine, ReLU, pooling, the
loss) is memory traffic, not GEMM work, and is left out, so the floor is the GEMM work at the GEMM rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs per sample of one forward: all of it, and the part up to the last BatchNorm (what a pass that only
    recomputes BatchNorm statistics must run)."""

    total: int
    through_last_batchnorm: int

    def per_point(self, evaluated: int, batchnorm_samples: int = 0) -> int:
        """One point: forwards of `evaluated` samples, and BatchNorm recomputed on `batchnorm_samples`."""
        return self.total * evaluated + self.through_last_batchnorm * batchnorm_samples


def forward_flops(model: nn.Module, sample: Tensor) -> ForwardFlops:
    """Count the FLOPs of `model` on one sample (`sample` with a batch axis of 1; the model is run once, in eval
    mode and without gradients, and left in the mode it was in)."""
    if sample.shape[0] != 1:
        raise ValueError(f"pass one sample with its batch axis, shape [1, ...], not {tuple(sample.shape)}")
    counted: list[int] = []  # per call: multiply-adds, or -1 for a BatchNorm
    counted_types = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    hooks = [m.register_forward_hook(lambda m, args, out: counted.append(_multiply_adds(m, out)))
             for m in model.modules() if isinstance(m, counted_types)]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    last_norm = max((i for i, macs in enumerate(counted) if macs < 0), default=-1)
    total = sum(macs for macs in counted if macs > 0)
    through = sum(macs for macs in counted[:last_norm + 1] if macs > 0)
    return ForwardFlops(2 * total, 2 * through)


def _multiply_adds(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return -1
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    per_output = module.in_channels // module.groups * module.weight[0, 0].numel()
    return out.numel() * per_output
