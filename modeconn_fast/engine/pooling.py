"""Max pooling on CPU, with the window maxima found in the memory format whose kernel is faster.

On CPU, torch's max_pool2d over contiguous NCHW tensors is slow for small feature maps (measured with
torch 2.13 on 2 cores: [512, 16, 8, 8] 4.3 ms NCHW, 1.2 ms through channels-last including both conversions;
equal or worse from 32×32 up). The values are identical; the output is contiguous NCHW as usual.

Where gradients are recorded (training through the view), pooling in channels-last throughout costs more than it
saves (its backward and the gradient's conversions), so only the indices of the window maxima come from the
channels-last kernel, and the output is gathered from the NCHW input at those indices: its backward is a plain
scatter into NCHW, to the same elements as max_pool2d's own backward (measured on one thread, forward and backward
with the ReLU before it: [128, 16, 8, 8] 0.39 ms against 0.92 ms, [1024, 16, 8, 8] 3.7 ms against 7.8 ms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_MAP = 256  # H·W up to which channels-last wins
MANY_CHANNELS = 8


class MaxPool2dFastCPU(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if not (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[1] >= MANY_CHANNELS
                and x.shape[2] * x.shape[3] <= SMALL_MAP):
            return self.pool(x)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.pool(channels_last).contiguous()
        with torch.no_grad():
            pool = self.pool
            _, where = F.max_pool2d(channels_last, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                    ceil_mode=pool.ceil_mode, return_indices=True)
        where = where.contiguous()  # [N, C, H', W']: flat positions h·W + w in each input plane
        return x.flatten(2).gather(2, where.flatten(2)).view(where.shape)


def faster_pooling(module: nn.Module) -> nn.Module | None:
    """The faster stand-in for an exact nn.MaxPool2d without hooks or indices, else None."""
    if type(module) is nn.MaxPool2d and not module.return_indices and not (module._forward_hooks or module._forward_pre_hooks):
        return MaxPool2dFastCPU(module)
    return None
