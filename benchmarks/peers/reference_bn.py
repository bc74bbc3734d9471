"""Curve evaluation with BatchNorm as the 2018 reference code runs it (Garipov et al., dnn-mode-connectivity).

Per point t: load θ(t); reset every BatchNorm's running statistics; one pass over the training batches in
train mode with momentum b/(n+b) for a batch of b after n samples (a cumulative average); then, in eval mode,
one pass over the training batches and one over the test batches for loss and error.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .state_dict_loop import mixed_state

Batches = Sequence[tuple[Tensor, Tensor]]


def update_bn(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Reset BatchNorm statistics and recompute them in one train-mode pass (cumulative average)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    net.train()
    seen = 0
    for inputs, _ in batches:
        size = inputs.shape[0]
        for m in norms:
            m.momentum = size / (seen + size)
        net(inputs)
        seen += size
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def loss_and_error(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and top-1 error over the batches, in eval mode."""
    net.eval()
    loss_sum, wrong, count = 0.0, 0, 0
    for inputs, targets in batches:
        outputs = net(inputs)
        loss_sum += F.cross_entropy(outputs, targets).item() * inputs.shape[0]
        wrong += int((outputs.argmax(dim=1) != targets).sum())
        count += inputs.shape[0]
    return loss_sum / count, wrong / count


def curve_metrics(model: nn.Module, members: Sequence[Mapping[str, Tensor]], coeffs: Tensor, train: Batches,
                  test: Batches) -> dict[str, Tensor]:
    """train/test loss and error at every row of `coeffs` (BatchNorm recomputed on `train` per point)."""
    net = copy.deepcopy(model)
    float_members = [{n: t for n, t in m.items() if torch.is_floating_point(t)} for m in members]
    columns: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_error", "test_loss", "test_error")}
    with torch.no_grad():
        for row in coeffs:
            net.load_state_dict(mixed_state(float_members, row), strict=False)
            update_bn(net, train)
            for split, batches in (("train", train), ("test", test)):
                loss, error = loss_and_error(net, batches)
                columns[f"{split}_loss"].append(loss)
                columns[f"{split}_error"].append(error)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in columns.items()}
