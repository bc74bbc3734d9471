"""Per-point loss and top-1 error, accumulated over batches in float64.

loss(p)  = mean over all targets of loss_fn(outputs(p), targets)      (default: cross-entropy)
error(p) = fraction of targets whose arg-max class (axis 1 of the outputs) is wrong, in [0, 1];
           NaN for a point whose loss is not finite (its outputs hold NaN or +inf).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]
METRICS = ("loss", "error")


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {metrics}")
    return metrics


class MetricSums:
    """Running sums for P points. `loss_fn(outputs, targets)` may return per-target losses
    (reduction='none', fastest: one call for all points) or their mean (then it is called once per point)."""

    def __init__(self, metrics: tuple[str, ...], points: int, device: torch.device, loss_fn: LossFn | None = None):
        self.metrics = metrics
        self.loss_fn = loss_fn
        self.per_point_calls: bool | None = None if loss_fn is not None else False
        self.loss = torch.zeros(points, dtype=torch.float64, device=device)
        self.wrong = torch.zeros(points, dtype=torch.float64, device=device)
        self.finite = torch.ones(points, dtype=torch.bool, device=device)
        self.target_count = 0  # targets seen by each point
        self.loss_weight = 0

    def add(self, outputs: Tensor, targets: Tensor, start: int) -> None:
        """outputs [Pc, B, ...] of points start … start+Pc−1, targets [B, ...].

        Every chunk of points sees every batch; the counts of targets are taken while the first chunk runs.
        """
        points = outputs.shape[0]
        where = slice(start, start + points)
        flat_outputs = outputs.reshape(-1, *outputs.shape[2:])
        flat_targets = targets.unsqueeze(0).expand(points, *targets.shape).reshape(-1, *targets.shape[1:])
        if start == 0:
            self.target_count += targets.numel()
        if "loss" in self.metrics:
            loss, weight = self._loss_sums(outputs, targets, flat_outputs, flat_targets)
            self.loss[where] += loss
            self.finite[where] &= torch.isfinite(loss)  # NaN or +inf in the outputs make the loss NaN
            if start == 0:
                self.loss_weight += weight
        else:
            self.finite[where] &= torch.isfinite(outputs.reshape(points, -1)).all(dim=1)
        if "error" in self.metrics:
            if torch.is_floating_point(targets) or torch.is_complex(targets):
                raise ValueError("metric 'error' needs integer class targets; for other targets pass metrics=('loss',)")
            if flat_outputs.dim() < 2 or flat_outputs.shape[1] == 0:
                raise ValueError("metric 'error' needs outputs with a class axis (axis 1, e.g. logits [N, classes])")
            wrong = flat_outputs.argmax(dim=1) != flat_targets
            self.wrong[where] += wrong.reshape(points, -1).sum(dim=1).double()

    def _loss_sums(self, outputs: Tensor, targets: Tensor, flat_outputs: Tensor, flat_targets: Tensor) -> tuple[Tensor, int]:
        points = outputs.shape[0]
        if self.loss_fn is None:
            if outputs.dim() < 3:
                raise ValueError("the default loss, cross-entropy, needs outputs with a class axis (axis 1 of the "
                                 "model's output, e.g. logits [N, classes]); pass loss_fn for other outputs")
            at_least_fp32 = torch.promote_types(flat_outputs.dtype, torch.float32)  # fp16 / bf16 logits in fp32
            losses = F.cross_entropy(flat_outputs.to(at_least_fp32), flat_targets, reduction="none")
            return losses.reshape(points, -1).sum(dim=1, dtype=torch.float64), losses.numel() // points
        if not self.per_point_calls:
            losses = self.loss_fn(flat_outputs, flat_targets)
            if losses.dim() > 0 and losses.numel() % points == 0:
                self.per_point_calls = False
                return losses.reshape(points, -1).sum(dim=1, dtype=torch.float64), losses.numel() // points
            self.per_point_calls = True
        samples = targets.shape[0]
        sums = torch.stack([self.loss_fn(outputs[p], targets).reshape(()).double() * samples for p in range(points)])
        return sums, samples

    def result(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        if "loss" in self.metrics:
            values["loss"] = self.loss / self.loss_weight
        if "error" in self.metrics:
            error = self.wrong / self.target_count
            values["error"] = torch.where(self.finite, error, torch.full_like(error, float("nan")))
        return {name: values[name] for name in self.metrics}

