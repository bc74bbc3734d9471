"""One point of a trainable subspace run as the plain model: training with one coefficient row per step.

    θ(c) = c · B,   B = [θ_0; …; θ_{K−1}] ∈ R^{K×D}   (every parameter of control point k flattened, row k)

A single point has nothing to fold into the batch axis, so its fastest forward is the model itself at θ(c):
one product of the row with the flat basis gives every layer's weights (one autograd node, where mixing layer by
layer takes one per tensor), a view of it per parameter goes into a private copy of the architecture, and the
model's own forward runs, its max-pooling layers swapped for the view's faster ones (`pooling.py`). That copy is
in train mode with BatchNorm keeping no running statistics, so each batch is normalised with its own statistics
and nothing accumulates, as in the subspace view's train mode.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..engine.pooling import faster_pooling

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Exact types whose forward reads its weights as attributes at every call (no cached copies of them, unlike RNNs).
_READS_ATTRIBUTES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, *_BATCHNORMS)


def supports_one_point(model: nn.Module, float_entries: list[str]) -> bool:
    """Whether `OnePointModel` runs `model` exactly: every module holding parameters is of a type in
    _READS_ATTRIBUTES, not parametrized, and the floating-point entries besides the parameters are BatchNorm's
    running statistics (which train mode does not read)."""
    allowed = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for prefix, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        if own and (type(module) not in _READS_ATTRIBUTES or parametrize.is_parametrized(module)):
            return False
        if type(module) in _BATCHNORMS:
            allowed |= {f"{prefix}.{name}" if prefix else name for name in ("running_mean", "running_var")}
    return set(float_entries) <= allowed


class OnePointModel:
    """A private train-mode copy of `architecture` (see `supports_one_point`) run at one point of a subspace."""

    def __init__(self, architecture: nn.Module, parameter_names: list[str]):
        model = copy.deepcopy(architecture).train()
        index = {id(p): parameter_names.index(name) for name, p in model.named_parameters()}
        self.slots: list[tuple[nn.Module, str, int]] = []  # every (module, attribute) holding parameter i
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    self.slots.append((module, name, index[id(p)]))
                    del module._parameters[name]  # read from the instance's __dict__ instead (set per call)
            if type(module) in _BATCHNORMS:  # batch statistics in train mode, nothing accumulated
                module.running_mean = module.running_var = module.num_batches_tracked = None
        for module in list(model.modules()):  # max-pooling as the view runs it (the same numbers)
            for name, child in module._modules.items():
                if child is not None and (pooling := faster_pooling(child)) is not None:
                    module._modules[name] = pooling
        self.model = model
        shapes = dict(architecture.named_parameters())
        self.shapes = [shapes[name].shape for name in parameter_names]

    def __call__(self, per_point: list[list[Tensor]], row: Tensor, inputs: tuple[Tensor, ...]) -> object:
        """The model's output at Σ_k row[0, k] θ_k, with θ_k the parameters `per_point[k]` (in `parameter_names`
        order); gradients reach those that require them."""
        mixed = mixed_parameters(per_point, row, self.shapes)
        for module, name, i in self.slots:
            module.__dict__[name] = mixed[i][0]
        return self.model(*inputs)


def mixed_parameters(per_point: list[list[Tensor]], rows: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Σ_k rows[p, k] θ_k for every parameter, [P, *shape] each: one product of the rows [P, K] with the flat basis
    [K, D] (θ_k = `per_point[k]`, the parameters of control point k), then a view per parameter."""
    basis = torch.cat([p.reshape(-1) for params in per_point for p in params]).view(len(per_point), -1)
    parts = (rows @ basis).split([shape.numel() for shape in shapes], dim=1)
    return [part.view(len(rows), *shape) for part, shape in zip(parts, shapes)]
