"""Per-point metrics, accumulated over all batches in float64.

With outputs(p) the model's outputs at point p (class axis 1) and q = softmax(outputs) over the classes:

loss(p)  = mean over all targets of loss_fn(outputs(p), targets)      (default: cross-entropy)
error(p) = fraction of targets whose arg-max class is wrong, in [0, 1]
nll(p)   = mean over targets of −log q_y                               (whatever loss_fn is)
brier(p) = mean over targets of Σ_c (q_c − [c = y])²                   (Brier 1950; in [0, 2])
ece(p)   = expected calibration error over 15 equal-width confidence bins (`calibration.py`)
<name>(p) = mean over samples of fn(outputs(p), targets), for a custom metric `(name, fn)`: fn maps a batch
           (outputs [N, ...], targets [N, ...]) to one value per sample, Tensor[N]

error, nll, brier and ece are NaN at a point whose outputs are not finite (NaN or +inf).

With the default loss, logits [P, N, C] of fewer than SMALL_CLASSES classes and class targets, loss and error
come from one pass (`small_class_cross_entropy`): torch's log-softmax and arg-max kernels are several times
slower on so narrow a class axis; for float32 logits on CPU, once a process has run enough of them, that pass is
a compiled kernel (`cpu_kernels.py`, 3× faster; `compiled_cpu.py` says when it loads). `fast=False` keeps the plain calls (F.cross_entropy,
argmax).
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compiled_cpu
from .calibration import ReliabilityBins

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], Tensor]
MetricSpec = Union[str, tuple[str, MetricFn]]
METRICS = ("loss", "error", "nll", "brier", "ece")
_CLASS_METRICS = ("error", "nll", "brier", "ece")  # need class outputs and integer targets
_PROBABILITY_METRICS = ("nll", "brier", "ece")
# Below this many classes torch's CPU log_softmax and argmax run a slow scalar path: for logits [8192, 10] on one
# thread, F.cross_entropy + argmax took 1.5 ms, `small_class_cross_entropy` 0.34 ms (equal at 16 classes).
SMALL_CLASSES = 16


def check_metrics(metrics: str | Sequence[MetricSpec]) -> dict[str, MetricFn | None]:
    """The metrics by name, in order: None for a built-in one, the function for a custom `(name, fn)` pair."""
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    chosen: dict[str, MetricFn | None] = {}
    for spec in metrics:
        if isinstance(spec, str) and spec in METRICS:
            name, fn = spec, None
        elif (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and callable(spec[1])
              and spec[0] not in METRICS):
            name, fn = spec
        else:
            raise ValueError(f"metrics must be a non-empty selection of {METRICS} and custom (name, fn) pairs, "
                             f"fn(outputs, targets) -> Tensor[N] one value per sample, with names of their own; "
                             f"got {spec!r}")
        if name in chosen:
            raise ValueError(f"metrics names {name!r} twice")
        chosen[name] = fn
    if not chosen:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS} and custom (name, fn) pairs")
    return chosen


class MetricSums:
    """Running sums for P points. `loss_fn(outputs, targets)` may return per-target losses
    (reduction='none', fastest: one call for all points) or their mean (then it is called once per point)."""

    def __init__(self, metrics: dict[str, MetricFn | None], points: int, device: torch.device,
                 loss_fn: LossFn | None = None, fast: bool = True):
        self.metrics = metrics
        self.loss_fn = loss_fn
        self.fast = fast
        self._checked_targets: tuple[Tensor, int, int, bool] | None = None  # targets, version, classes, in range
        self.per_point_calls: bool | None = None if loss_fn is not None else False
        self.sums = {name: torch.zeros(points, dtype=torch.float64, device=device)
                     for name in metrics if name != "ece"}
        self.reliability = ReliabilityBins.zeros(points, device=device) if "ece" in metrics else None
        self.finite = torch.ones(points, dtype=torch.bool, device=device)
        self.target_count = 0  # targets seen by each point
        self.sample_count = 0  # samples (rows) seen by each point
        self.loss_weight = 0

    def add(self, outputs: Tensor, targets: Tensor, start: int) -> None:
        """outputs [Pc, B, ...] of points start … start+Pc−1, targets [B, ...].

        Every chunk of points sees every batch; the counts of targets are taken while the first chunk runs.
        """
        points = outputs.shape[0]
        where = slice(start, start + points)
        if start == 0:
            self.target_count += targets.numel()
            self.sample_count += targets.shape[0]
        wrong = None  # wrong arg-max classes per point, where the one-pass cross-entropy gave them
        if "loss" in self.metrics:
            if self._small_classes(outputs, targets):
                loss, wrong = self._one_pass(outputs, targets)
                weight = targets.numel()
            else:
                loss, weight = self._loss_sums(outputs, targets, *_flat(outputs, targets))
            self.sums["loss"][where].add_(loss)
            self.finite[where].logical_and_(torch.isfinite(loss))  # NaN or +inf in the outputs make the loss NaN
            if start == 0:
                self.loss_weight += weight
        else:
            self.finite[where] &= torch.isfinite(outputs.reshape(points, -1)).all(dim=1)
        if "error" in self.metrics and wrong is not None:
            self.sums["error"][where].add_(wrong)
        if wrong is not None and self.takes_one_pass_only():
            return  # the one-pass path gave all (its targets are classes in range)
        flat_outputs, flat_targets = _flat(outputs, targets)
        if any(name in self.metrics for name in _CLASS_METRICS):
            _check_classes(flat_outputs, targets, [name for name in _CLASS_METRICS if name in self.metrics][0])
        if "error" in self.metrics and wrong is None:
            wrong = flat_outputs.argmax(dim=1) != flat_targets
            self.sums["error"][where] += wrong.reshape(points, -1).sum(dim=1).double()
        if any(name in self.metrics for name in _PROBABILITY_METRICS):
            self._add_probability_metrics(outputs, targets, flat_outputs, flat_targets, where)
        for name, fn in self.metrics.items():
            if fn is not None:
                values = fn(flat_outputs, flat_targets)
                if not isinstance(values, Tensor) or values.shape != (flat_outputs.shape[0],):
                    shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                    raise ValueError(f"metric {name!r} returned {shape} for a batch of {flat_outputs.shape[0]} "
                                     "samples; it must return one value per sample, a Tensor of shape [N]")
                self.sums[name][where] += values.reshape(points, -1).sum(dim=1, dtype=torch.float64)

    def _one_pass(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(loss sums float64 [P], wrong arg-max counts [P]) of `small_class_cross_entropy`, by the compiled
        kernel for float32 logits where it is loaded (`compiled_cpu.py`: loaded in the background once the process
        has spent a second in evaluations)."""
        if outputs.device.type == "cpu" and outputs.dtype == torch.float32 and not outputs.requires_grad:
            kernels = compiled_cpu.kernels()
            if kernels is not None:
                loss = torch.empty(outputs.shape[0], dtype=torch.float64)
                wrong = torch.empty(outputs.shape[0], dtype=torch.int64)
                kernels.cross_entropy_sums(outputs.numpy(), targets.numpy(), loss.numpy(), wrong.numpy())
                return loss, wrong
        losses, predicted = small_class_cross_entropy(outputs, targets)
        return losses.sum(dim=1, dtype=torch.float64), (predicted != targets).sum(dim=1)

    def _small_classes(self, outputs: Tensor, targets: Tensor) -> bool:
        """Whether the default loss can take the one-pass path: logits [P, N, C < SMALL_CLASSES] in fp32 or fp64
        and int64 class targets [N] all in range (others, e.g. ignore_index, go to F.cross_entropy)."""
        return (outputs.dim() == 3 and outputs.dtype in (torch.float32, torch.float64)
                and self.one_pass_applies(outputs.shape[2], targets))

    def one_pass_applies(self, classes: int, targets: Tensor) -> bool:
        """Whether the default loss of logits with `classes` < SMALL_CLASSES classes against `targets` comes from
        the one pass of `small_class_cross_entropy`: int64 class targets [N] all in range."""
        if not (self.fast and self.loss_fn is None and 0 < classes < SMALL_CLASSES and targets.dim() == 1
                and targets.dtype == torch.long and targets.numel() > 0):
            return False
        checked = self._checked_targets  # every chunk of points sees the same batch: check it once
        if checked is None or checked[0] is not targets or checked[1:3] != (targets._version, classes):
            lowest, highest = torch.aminmax(targets)
            in_range = 0 <= int(lowest) and int(highest) < classes
            checked = self._checked_targets = (targets, targets._version, classes, in_range)
        return checked[3]

    def takes_one_pass_only(self) -> bool:
        """Whether the metrics asked are loss and error alone, with the default loss (the one pass gives both)."""
        return (self.fast and self.loss_fn is None and "loss" in self.metrics
                and all(name in ("loss", "error") for name in self.metrics))

    def add_one_pass(self, loss: Tensor, wrong: Tensor, targets: Tensor, start: int) -> None:
        """Loss sums (float64) and wrong arg-max counts [Pc] of points start … start+Pc−1 on a batch with class
        targets [N] (from a pass that gave both, e.g. `mlp_metrics.py`; metrics: `takes_one_pass_only`)."""
        where = slice(start, start + loss.shape[0])
        if start == 0:
            self.target_count += targets.numel()
            self.sample_count += targets.shape[0]
            self.loss_weight += targets.numel()
        self.sums["loss"][where] += loss
        self.finite[where] &= torch.isfinite(loss)
        if "error" in self.metrics:
            self.sums["error"][where] += wrong

    def _add_probability_metrics(self, outputs: Tensor, targets: Tensor, flat_outputs: Tensor, flat_targets: Tensor,
                                 where: slice) -> None:
        points = outputs.shape[0]
        log_probs = F.log_softmax(flat_outputs.to(torch.promote_types(flat_outputs.dtype, torch.float32)), dim=1)
        picked = log_probs.gather(1, flat_targets.unsqueeze(1)).squeeze(1)  # log q_y per target
        if "nll" in self.metrics:
            self.sums["nll"][where] -= picked.reshape(points, -1).sum(dim=1, dtype=torch.float64)
        probs = log_probs.exp()
        if "brier" in self.metrics:  # Σ_c q_c² − 2 q_y + 1
            brier = probs.square().sum(dim=1) - 2 * picked.exp() + 1
            self.sums["brier"][where] += brier.reshape(points, -1).sum(dim=1, dtype=torch.float64)
        if self.reliability is not None:  # class axis last: [P, targets, C]
            per_point = probs.reshape(points, *outputs.shape[1:]).movedim(2, -1).reshape(points, -1, probs.shape[1])
            self.reliability[where].add(per_point, targets.reshape(-1))

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
        for name, fn in self.metrics.items():
            if name == "loss":
                values[name] = self.sums[name] / self.loss_weight
            elif name == "ece":
                values[name] = self.reliability.ece()
            elif fn is None:  # error, nll, brier: per target
                values[name] = self.sums[name] / self.target_count
            else:
                values[name] = self.sums[name] / self.sample_count
            if name in _CLASS_METRICS:
                values[name] = torch.where(self.finite, values[name], torch.full_like(values[name], float("nan")))
        return values


def small_class_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and predicted class of logits [P, N, C] against class targets [N], from one max pass:

        m = max_c x_c,   loss = log Σ_c exp(x_c − m) − (x_y − m),   predicted = the first c with x_c = m

    (the shifted log-softmax that F.cross_entropy computes, and argmax's choice among ties). [P, N] each."""
    top, predicted = logits.max(dim=2, keepdim=True)
    shifted = logits - top
    picked = shifted.gather(2, targets.reshape(1, -1, 1).expand(logits.shape[0], -1, 1))
    return shifted.exp_().sum(dim=2).log_().sub_(picked.squeeze(2)), predicted.squeeze(2)


def _flat(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """outputs [P, B, ...] as [P·B, ...] and targets [B, ...] repeated for every point as [P·B, ...]."""
    points = outputs.shape[0]
    flat_targets = targets.unsqueeze(0).expand(points, *targets.shape).reshape(-1, *targets.shape[1:])
    return outputs.reshape(-1, *outputs.shape[2:]), flat_targets


def _check_classes(flat_outputs: Tensor, targets: Tensor, metric: str) -> None:
    if torch.is_floating_point(targets) or torch.is_complex(targets):
        raise ValueError(f"metric {metric!r} needs integer class targets; for other targets pass metrics=('loss',) "
                         "or custom (name, fn) metrics")
    if flat_outputs.dim() < 2 or flat_outputs.shape[1] == 0:
        raise ValueError(f"metric {metric!r} needs outputs with a class axis (axis 1, e.g. logits [N, classes])")
