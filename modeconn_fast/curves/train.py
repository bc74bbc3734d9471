"""Curve training (Garipov et al. 2018): minimise E_{t~U[0,1]} L(θ(t)) over the free control points.

    loss = mean over the step's t values of [ L(θ(t); minibatch) + ½·wd·‖θ(t)‖² ]

as the 2018 reference does (weight decay on the sampled point's weights, not SGD's decay of the control
points). The data loss goes through autograd; the weight decay term's gradient is added to the control points'
gradients directly (`TrainableSubspace.add_weight_decay`), its value from the control points' Gram matrix.
Each minibatch draws `t_per_step` values of t, all run in one pass on the same minibatch (`TrainableSubspace.outputs`:
the plain model at one t, an nn.Sequential sample-major at several, else the subspace view).
BatchNorm trains in train mode with each t's own batch statistics; Dropout is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..engine.batches import Batches, move
from ..memory import keep_freed_memory
from .curve import Curve

SCHEDULES = ("garipov", "constant")


def garipov_schedule(lr: float, epoch: int, epochs: int) -> float:
    """The reference's learning rate for epoch `epoch` of `epochs`, counted from 1 as the reference counts them:
    lr while epoch/epochs ≤ ½, then a linear decay to 0.01·lr at 90 % of the epochs, then 0.01·lr."""
    alpha = epoch / epochs
    if alpha <= 0.5:
        factor = 1.0
    elif alpha <= 0.9:
        factor = 1.0 - (alpha - 0.5) / 0.4 * 0.99
    else:
        factor = 0.01
    return factor * lr


@dataclass
class CurveHistory:
    """Per epoch: the mean training loss (data loss + weight decay term) and the learning rate; per step: the loss."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)


def train_curve(curve: Curve, train_data: Any, *, epochs: int, lr: float, momentum: float = 0.9,
                weight_decay: float = 5e-4, batch_size: int = 128, t_per_step: int = 1, schedule: str = "garipov",
                loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, seed: int = 0,
                progress: bool = True) -> CurveHistory:
    """Train the free control points of `curve` with SGD (momentum, no SGD weight decay) for `epochs` epochs.

    train_data: `(inputs, targets)` tensors, shuffled into minibatches of `batch_size` from `seed`, or any
    re-iterable of batches (a DataLoader; its own order). Per step, t ~ U[0, 1] (`t_per_step` values, drawn from
    the same seeded generator after the epoch's shuffle). schedule: "garipov" (see `garipov_schedule`) or
    "constant". loss_fn: mean loss of outputs [B, ...] against targets (default cross-entropy).
    """
    _check_arguments(epochs, lr, t_per_step, batch_size, schedule)
    free = [p for p in curve.parameters() if p.requires_grad]
    if not free:
        raise ValueError("the curve has no free control points to train (fix_start and fix_end fix the ends; "
                         "bends are always free unless you froze them)")
    data = Batches(train_data, "train_data")
    loss_fn = loss_fn or F.cross_entropy
    device = free[0].device
    generator = torch.Generator().manual_seed(seed)
    # foreach: one op per update for all tensors (the same arithmetic as the loop over them)
    optimizer = torch.optim.SGD(free, lr=lr, momentum=momentum, weight_decay=0.0, foreach=True)
    history = CurveHistory()
    was_training = curve.training
    curve.train()
    try:
        for epoch in tqdm(range(epochs), desc="train curve", unit="epoch", disable=not progress, leave=False):
            rate = garipov_schedule(lr, epoch + 1, epochs) if schedule == "garipov" else lr
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss_sum, samples = 0.0, 0
            for inputs, targets in minibatches(data, batch_size, generator):
                t = torch.rand(t_per_step, generator=generator, dtype=torch.float64)
                rows = curve.coefficients(t)
                loss = _data_loss(curve, move(inputs, device), targets.to(device), rows, loss_fn)
                optimizer.zero_grad()
                loss.backward()
                decay = curve.add_weight_decay(rows, weight_decay) if weight_decay else 0.0
                optimizer.step()
                value = loss.item() + decay
                history.step_loss.append(value)
                loss_sum += value * targets.shape[0]
                samples += targets.shape[0]
            history.loss.append(loss_sum / samples)
            history.lr.append(rate)
    finally:
        curve.train(was_training)
    return history


def _data_loss(curve: Curve, inputs: Any, targets: Tensor, rows: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Mean over the coefficient rows [T, K] (one per t) of the data loss, all rows in one pass."""
    outputs = curve.outputs(inputs, rows)  # [T, B, ...]
    points = outputs.shape[0]
    return loss_fn(outputs.reshape(-1, *outputs.shape[2:]),
                   targets.unsqueeze(0).expand(points, *targets.shape).reshape(-1, *targets.shape[1:]))


def minibatches(data: Batches, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Any, Tensor]]:
    """Shuffled minibatches of a tensor dataset (the order drawn from `generator`), or the batches as given. The
    training loops' steps allocate and free the same activations each step: freed memory is kept
    (`keep_freed_memory`)."""
    keep_freed_memory()
    if data.tensors is None:
        yield from data
        return
    inputs, targets = data.tensors
    for rows in torch.randperm(targets.shape[0], generator=generator).split(batch_size):
        rows = rows.to(targets.device)
        yield (inputs[rows] if isinstance(inputs, Tensor) else tuple(x[rows] for x in inputs)), targets[rows]


def _check_arguments(epochs: int, lr: float, t_per_step: int, batch_size: int, schedule: str) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not isinstance(t_per_step, int) or t_per_step < 1:
        raise ValueError(f"t_per_step must be an integer ≥ 1 (t values per minibatch), got {t_per_step!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
