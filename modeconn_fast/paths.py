"""The straight line between two models: θ(t) = (1 − t) θ_A + t θ_B, and its barriers.

Loss barrier (Entezari et al. 2021):  max_t [ L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B)) ]
Error barrier (Frankle et al. 2020):  max_t err(θ(t)) − ½ (err(θ_A) + err(θ_B))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .engine import evaluate


@dataclass
class PathResult:
    """Metrics along a path: `loss[i]` and `error[i]` at `t[i]` (`error` is None when not asked for, e.g. for a
    regression model); `bn_mode` says how BatchNorm ran."""

    t: Tensor
    loss: Tensor
    error: Tensor | None
    bn_mode: str

    def barrier(self, metric: str = "loss") -> float:
        """The loss barrier against the line between the endpoints' values, or the error barrier
        (maximum error minus the mean of the endpoints' errors)."""
        if metric not in ("loss", "error"):
            raise ValueError(f"metric must be 'loss' or 'error', got {metric!r}")
        if not (float(self.t[0]) == 0.0 and float(self.t[-1]) == 1.0):
            raise ValueError("a barrier needs the path's endpoints: t must start at 0 and end at 1")
        values = getattr(self, metric)
        if values is None:
            raise ValueError("this path has no error values: it was evaluated with metrics=('loss',)")
        if metric == "loss":
            line = (1 - self.t) * values[0] + self.t * values[-1]
            return float((values - line).max())
        return float(values.max() - (values[0] + values[-1]) / 2)


def linear_coeffs(t: Tensor) -> Tensor:
    """Coefficient rows (1 − t, t) over the basis (θ_A, θ_B): [len(t), 2]."""
    return torch.stack([1 - t, t], dim=1)


def interpolate(model_a: nn.Module, model_b: nn.Module, data: Any, *, points: int = 25,
                metrics: Sequence[str] = ("loss", "error"), **engine_options: Any) -> PathResult:
    """Loss (and error) at `points` evenly spaced t ∈ [0, 1] on the straight line from model_a to model_b.

    metrics: ("loss", "error"), or ("loss",) for models whose targets are not class labels. engine_options go to
    `evaluate` (loss_fn, bn, bn_data, memory_budget, progress, output).
    """
    if points < 2:
        raise ValueError(f"a path needs at least 2 points (its two ends), got points={points}")
    if "loss" not in metrics:
        raise ValueError(f"a path always carries its loss: metrics must include 'loss', got {tuple(metrics)}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    result = evaluate(model_a, [model_a, model_b], linear_coeffs(t), data, metrics=metrics, **engine_options)
    error = result["error"].cpu() if "error" in result else None
    return PathResult(t=t, loss=result["loss"].cpu(), error=error, bn_mode=result.bn_mode)


def barrier(model_a: nn.Module, model_b: nn.Module, data: Any, *, metric: str = "loss", points: int = 25,
            **engine_options: Any) -> float:
    """The loss or error barrier of the straight line between two models (see `PathResult.barrier`)."""
    metrics = ("loss", "error") if metric == "error" else ("loss",)
    return interpolate(model_a, model_b, data, points=points, metrics=metrics, **engine_options).barrier(metric)
