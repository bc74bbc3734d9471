"""REPAIR (Jordan et al. 2022): undo the variance collapse of interpolated networks.

At θ_α = (1 − α) θ_A + α θ_B (B already aligned to A), the channels of every hidden layer are rescaled so that
their mean and standard deviation on the data are the interpolation of the endpoints':

    μ* = (1 − α) μ_A + α μ_B,   σ* = (1 − α) σ_A + α σ_B,   y ← (y − μ_α) · σ*/σ_α + μ*.

The affine correction is folded into the layer that produces y (a BatchNorm following a Linear/Conv, else
the Linear/Conv itself), layer by layer in graph order, each measured after the corrections upstream.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.batches import Batches
from .activation import units_as_columns
from .derive import trace
from .spec import check_same_architecture

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def repair(model_a: nn.Module, model_b: nn.Module, data: Any, *, alpha: float = 0.5, eps: float = 1e-5) -> nn.Module:
    """The interpolated model θ_α with REPAIR's per-channel statistics correction (a new module).

    model_b must already be aligned to model_a (e.g. `weight_matching(...).apply(model_b)`). data:
    `(inputs, targets)` tensors or an iterable of such batches (targets unused).
    """
    check_same_architecture(model_a, model_b)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    batches = Batches(data, "data")
    points = repair_points(model_a, batches.first[0])
    stats_a, stats_b = channel_stats(model_a, points, batches), channel_stats(model_b, points, batches)
    merged = copy.deepcopy(model_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    merged.load_state_dict({k: (1 - alpha) * v + alpha * state_b[k] if v.is_floating_point() else v for k, v in state_a.items()})
    modules = dict(merged.named_modules())
    for name, dim in points.items():
        mean, std = channel_stats(merged, {name: dim}, batches)[name]
        target_mean = (1 - alpha) * stats_a[name][0] + alpha * stats_b[name][0]
        target_std = (1 - alpha) * stats_a[name][1] + alpha * stats_b[name][1]
        scale = target_std / (std + eps)
        _fold(modules[name], scale, target_mean - mean * scale)
    return merged.eval()


def repair_points(model: nn.Module, example: Any) -> dict[str, int]:
    """Module name -> channel axis of its output, for every hidden Linear/Conv (its BatchNorm if one follows),
    in graph order. Hidden: its outputs belong to a permutation group (not the model's outputs)."""
    traced = trace(model, example)
    carried = {name: dim for nodes in traced.activations.values() for name, dim, _ in nodes}
    modules = dict(traced.graph_module.named_modules())
    points: dict[str, int] = {}
    for node in traced.graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS) or node.name not in carried:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORMS):
            if modules[users[0].target].affine:  # a BatchNorm without affine parameters re-normalises: skip
                points[users[0].target] = carried[node.name]
        else:
            points[node.target] = carried[node.name]
    return points


def channel_stats(model: nn.Module, points: dict[str, int], batches: Batches) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and standard deviation (float64) of the named modules' outputs, model in eval mode."""
    sums: dict[str, list[Any]] = {name: [0, 0.0, 0.0] for name in points}
    modules = dict(model.named_modules())

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            columns = units_as_columns(output.detach(), points[name], 1).double()
            entry = sums[name]
            entry[0] += columns.shape[0]
            entry[1] = entry[1] + columns.sum(0)
            entry[2] = entry[2] + (columns * columns).sum(0)

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in points]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()
            for inputs, _ in batches:
                model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        stats[name] = (mean, (squares / count - mean**2).clamp_min(0).sqrt())
    return stats


def _fold(module: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Make `module` output scale·y + shift per channel instead of y (a bias is added where there was none)."""
    with torch.no_grad():
        weight = module.weight
        view = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.to(weight.dtype).view(view))
        shift = shift.to(weight.dtype)
        if module.bias is None:
            module.bias = nn.Parameter(shift.clone())
        else:
            module.bias.mul_(scale.to(weight.dtype)).add_(shift)
