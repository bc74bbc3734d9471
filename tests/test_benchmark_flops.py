"""The benchmark floor's FLOP count against counts made by hand on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.flops import forward_flops


def test_conv_batchnorm_linear_counted_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(12, 5)).train()
    flops = forward_flops(model, torch.randn(1, 2, 4, 4))
    conv = 3 * 2 * 3 * 3 * (4 * 4)  # Cout · Cin · kh · kw · output positions = 864 multiply-adds
    linear = 12 * 5  # 60
    assert flops.total == 2 * (conv + linear) == 1848
    assert flops.through_last_batchnorm == 2 * conv == 1728
    assert flops.per_point(evaluated=10, batchnorm_samples=7) == 1848 * 10 + 1728 * 7
    assert model.training  # left as it was


def test_groups_stride_conv1d_and_no_batchnorm():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    flops = forward_flops(model, torch.randn(1, 4, 5, 5))
    conv = 6 * (4 // 2) * 3 * 3 * (2 * 2)  # outputs 2×2: (5 − 3) // 2 + 1
    assert flops.total == 2 * (conv + 24 * 3) and flops.through_last_batchnorm == 0
    sequence = nn.Conv1d(3, 2, 4)  # length 10 → 7 outputs
    assert forward_flops(sequence, torch.randn(1, 3, 10)).total == 2 * 2 * 3 * 4 * 7


def test_one_sample_only():
    with pytest.raises(ValueError, match="one sample"):
        forward_flops(nn.Linear(3, 2), torch.randn(2, 3))
