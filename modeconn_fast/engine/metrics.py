"""Per-point loss and top-1 error, accumulated over batches in float64.

loss(p)  = mean over all targets of loss_fn(outputs(p), targets)      (default: cross-entropy)
error(p) = fraction of targets whose arg-max class (axis 1 of the outputs) is wrong, in [0, 1];
           NaN for a point whose outputs hold NaN or ±inf.
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
        self.targets = 0  # per point
        self.loss_weight = 0

    def add(self, outputs: Tensor, targets: Tensor, start: int) -> None:
        """outputs [Pc, B, ...] of points start … start+Pc−1, targets [B, ...].

        Every chunk of points sees every batch; the counts of targets are taken while the first chunk runs.
        """
        where = slice(start, start + outputs.shape[0])
        if start == 0:
            self.targets += targets.numel()
        if "error" in self.metrics and (torch.is_floating_point(targets) or torch.is_complex(targets)):
            raise ValueError("metric 'error' needs integer class targets; for other targets pass metrics=('loss',)")
        if self.loss_fn is None and outputs.dim() == 3 and targets.dim() == 1 and not torch.is_floating_point(targets):
            loss, wrong, finite = _classification(outputs, targets)
            if start == 0:
                self.loss_weight += targets.numel()
        else:
            loss, wrong, finite = self._general(outputs, targets, start)
        self.finite[where] &= finite
        if loss is not None and "loss" in self.metrics:
            self.loss[where] += loss.double()
        if "error" in self.metrics:
            self.wrong[where] += wrong.double()

    def _general(self, outputs: Tensor, targets: Tensor, start: int) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Any output shape with the class axis at 1 of each sample's batch, and any loss_fn."""
        points = outputs.shape[0]
        flat_outputs = outputs.reshape(-1, *outputs.shape[2:])
        flat_targets = targets.unsqueeze(0).expand(points, *targets.shape).reshape(-1, *targets.shape[1:])
        finite = torch.isfinite(outputs.reshape(points, -1)).all(dim=1)
        loss = wrong = None
        if "loss" in self.metrics:
            loss, weight = self._loss_sums(outputs, targets, flat_outputs, flat_targets)
            if start == 0:
                self.loss_weight += weight
        if "error" in self.metrics:
            if flat_outputs.dim() < 2 or flat_outputs.shape[1:].numel() == 0:
                raise ValueError("metric 'error' needs outputs with a class axis (axis 1, e.g. logits [N, classes])")
            wrong = (flat_outputs.argmax(dim=1) != flat_targets).reshape(points, -1).sum(dim=1)
        return loss, wrong, finite

    def _loss_sums(self, outputs: Tensor, targets: Tensor, flat_outputs: Tensor, flat_targets: Tensor) -> tuple[Tensor, int]:
        points = outputs.shape[0]
        if self.loss_fn is None:
            losses = F.cross_entropy(flat_outputs, flat_targets, reduction="none")
            return losses.reshape(points, -1).sum(dim=1), losses.numel() // points
        if not self.per_point_calls:
            losses = self.loss_fn(flat_outputs, flat_targets)
            if losses.dim() > 0 and losses.numel() % points == 0:
                self.per_point_calls = False
                return losses.reshape(points, -1).sum(dim=1), losses.numel() // points
            self.per_point_calls = True
        samples = targets.shape[0]
        sums = torch.stack([self.loss_fn(outputs[p], targets).reshape(()) * samples for p in range(points)])
        return sums, samples

    def result(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        if "loss" in self.metrics:
            values["loss"] = self.loss / self.loss_weight
        if "error" in self.metrics:
            error = self.wrong / self.targets
            values["error"] = torch.where(self.finite, error, torch.full_like(error, float("nan")))
        return {name: values[name] for name in self.metrics}


def _classification(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits [P, B, C], labels [B]: per-point sums of cross-entropy and of wrong arg-max, and finiteness,
    from one max over the classes: CE = m + log Σ_c exp(z_c − m) − z_y with m = max_c z_c."""
    points, samples = outputs.shape[:2]
    top, predicted = outputs.max(dim=-1)
    labels = targets.unsqueeze(0).expand(points, samples)
    target_logit = outputs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    log_sum = (outputs - top.unsqueeze(-1)).exp_().sum(dim=-1).log_()
    loss = (top + log_sum - target_logit).sum(dim=1)
    wrong = (predicted != labels).sum(dim=1)
    return loss, wrong, torch.isfinite(top).all(dim=1)
