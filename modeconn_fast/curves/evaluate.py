"""Metrics along a curve: every t through the engine in one batched pass, and the curve summary of Garipov et al.

For each metric column: start, end, min, max, mean over the evaluated t, and the length-weighted average
    int = Σ_i ½ (v_i + v_{i+1}) ‖θ(t_{i+1}) − θ(t_i)‖ / Σ_i ‖θ(t_{i+1}) − θ(t_i)‖
(the 2018 reference's "int"), with distances over the model's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..engine import evaluate
from ..paths import PathResult
from .curve import Curve, segment_lengths


@dataclass
class CurveResult(PathResult):
    """`t`, `loss`, `error` (of the first dataset), `bn_mode` as a PathResult; `columns` has every metric of
    every dataset (e.g. "train_loss", "test_error"); `segment_lengths[i]` = ‖θ(t_{i+1}) − θ(t_i)‖; `length`
    their sum."""

    columns: dict[str, Tensor] = field(default_factory=dict)
    segment_lengths: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def length(self) -> float:
        return float(self.segment_lengths.sum())

    def __getitem__(self, column: str) -> Tensor:
        return self.columns[column]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per column: start, end, min, max, mean and the length-weighted average ("int")."""
        weights = self.segment_lengths.to(torch.float64)
        table = {}
        for name, values in self.columns.items():
            values = values.to(torch.float64)
            middle = 0.5 * (values[:-1] + values[1:])
            weighted = float((middle * weights).sum() / weights.sum()) if float(weights.sum()) > 0 else float(values.mean())
            table[name] = {"start": float(values[0]), "end": float(values[-1]), "min": float(values.min()),
                           "max": float(values.max()), "mean": float(values.mean()), "int": weighted}
        return table

    def barrier(self, metric: str = "loss", dataset: str | None = None) -> float:
        """The loss or error barrier of the curve (see `PathResult.barrier`), of `dataset` when several were given."""
        if dataset is None:
            return super().barrier(metric)
        column = f"{dataset}_{metric}"
        if column not in self.columns:
            raise ValueError(f"no column {column!r}; the columns are {sorted(self.columns)}")
        return PathResult(self.t, self.columns.get(f"{dataset}_loss"), self.columns.get(f"{dataset}_error"),
                          self.bn_mode).barrier(metric)


def evaluate_curve(curve: Curve, data: Any, *, points: int = 61, bn_data: Any = None,
                   metrics: Sequence[str] = ("loss", "error"), **engine_options: Any) -> CurveResult:
    """Loss and error at `points` evenly spaced t ∈ [0, 1], all through `evaluate` in one pass over the data.

    data: `(inputs, targets)`, batches, or a dict of them by name (e.g. {"train": ..., "test": ...}, one
    pass for all). bn_data: the batches to recompute every point's BatchNorm statistics from (usually the
    training data); without it the control points' stored statistics are mixed. engine_options go to
    `evaluate` (loss_fn, bn, memory_budget, progress, output; output defaults to the curve's).
    """
    if points < 2:
        raise ValueError(f"a curve needs at least 2 points (its two ends), got points={points}")
    if "loss" not in metrics:
        raise ValueError(f"a curve's result always carries its loss: metrics must include 'loss', got {tuple(metrics)}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    rows = curve.coefficients(t)
    basis = curve.basis()
    engine_options.setdefault("output", getattr(curve, "output", None))
    result = evaluate(curve.architecture, basis, rows, data, bn_data=bn_data, metrics=metrics, **engine_options)
    columns = {name: values.cpu() for name, values in result.items()}
    first = next(iter(data)) if isinstance(data, Mapping) else None
    prefix = f"{first}_" if first is not None else ""
    with torch.no_grad():
        lengths = segment_lengths(rows, curve.gram().double().cpu())
    return CurveResult(t=t, loss=columns[f"{prefix}loss"], error=columns.get(f"{prefix}error"), bn_mode=result.bn_mode,
                       columns=columns, segment_lengths=lengths)
