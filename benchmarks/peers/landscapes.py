"""`loss-landscapes` (PyPI) `planar_interpolation` with a metric that computes our loss: mean cross-entropy.

planar_interpolation walks the plane start + x·(one − start) + y·(two − start) by in-place steps of 1/steps:
column i has x = i/steps; it moves along y *before* evaluating, so even columns hold y = 1/steps … 1 and odd
columns (walked back) y = 0 … (steps−1)/steps. `visited_coordinates` gives exactly those points, so the
project can be checked against the very points the peer evaluated.
"""
from __future__ import annotations

import loss_landscapes
import loss_landscapes.metrics
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def planar_losses(start: nn.Module, one: nn.Module, two: nn.Module, inputs: Tensor, targets: Tensor,
                  steps: int) -> Tensor:
    """Mean cross-entropy at the steps×steps points planar_interpolation visits, in its [x, y] order."""
    metric = loss_landscapes.metrics.Loss(F.cross_entropy, inputs, targets)
    grid = loss_landscapes.planar_interpolation(start, one, two, metric, steps=steps, deepcopy_model=True)
    return torch.as_tensor(grid, dtype=torch.float64).reshape(-1)


def visited_coordinates(steps: int) -> Tensor:
    """[steps·steps, 2]: the (x, y) of each value planar_losses returns, row-major as it returns them."""
    i = torch.arange(steps, dtype=torch.float64).repeat_interleave(steps)
    j = torch.arange(steps, dtype=torch.float64).repeat(steps)
    y = j + (i % 2 == 0).double()  # even columns are shifted one step along y
    return torch.stack([i / steps, y / steps], dim=1)
