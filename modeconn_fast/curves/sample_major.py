"""Several points of a trainable subspace in train mode, for an nn.Sequential of standard layers, sample-major.

Activations are [N, P·C, ...]: each sample's P points side by side along the channel axis, point-major within it
(the view folds points into the batch axis instead, [P·N, C, ...]). Every layer then runs as one torch op without
moving the points back and forth, where the view's grouped convolutions and BatchNorm transpose [P, N] in and out:

- the first layer's input, shared by all points: a Linear, or a Conv with groups 1, runs once with the points'
  weights stacked along its outputs (W(p) = Σ_k c[p,k] W_k, [P·Cout, ...]); another first layer sees it repeated;
- a later Conv: one convolution grouped over points (groups = P·groups) on [N, P·C, ...];
- BatchNorm: torch's own, on P·C channels (each point's channels normalised with their own batch statistics);
- a later Linear on [N, P·Din]: one batched product over points;
- activations, Dropout, pooling and Flatten(1, -1) act per channel or per element and run unchanged
  ([N, P·C, H, W] flattens to [N, P·C·H·W], i.e. [N, P, C·H·W]).

On the CPU, a convolution's output of a small map (up to SMALL_MAP pixels) is made channels-last (a no-op after
the first: convolutions, BatchNorm, activations and pooling keep that layout), where torch's BatchNorm, ReLU and
max-pooling kernels and their backward passes run faster than over NCHW planes of a few pixels: B6 at 8 t per
step, alternating runs in one process (12, 12 and 30 of each), medians 18 %, 4 % and 13 % faster, the
same losses to 1.3e-6.

The output [N, P·D, ...] becomes [P, N, D, ...]. Points run in chunks whose activations stay in cache
(CHUNK_ELEMENTS). All weights come from one product of the coefficient rows with
the flat basis (`one_point.mixed_parameters`). B6 (curve training at 8 t per step): the copies of the point-major
layout took about a fifth of the step.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.pooling import SMALL_MAP, faster_pooling
from .one_point import mixed_parameters

# Exact types that act on each channel (or element) alone, whatever their number.
PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
               nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
# Points run together while one point's largest activation times their number stays within this many elements (a
# chunk's activations stay in cache; B6 on one thread, 8 t per step, 2 cores loaded: 4 points of [128, 16, 8, 8] at
# a time 3.0 s, all 8 at once 3.8 s, 2 at a time 3.2 s).
CHUNK_ELEMENTS = 1 << 19
_POOLED_DIMS = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2}
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def supports_sample_major(model: nn.Module, float_entries: list[str]) -> bool:
    """An nn.Sequential without hooks of the layers above (convolutions with zero padding, pooling without indices,
    Flatten from dim 1 to the end), whose floating-point entries are the layers' parameters and BatchNorm's running
    statistics. (A Linear must get a 2-d input, checked when it runs.)"""
    if type(model) is not nn.Sequential or len(model) == 0:
        return False
    allowed = set()
    for name, module in model.named_children():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return False
        if type(module) in _WEIGHTED:
            conv = isinstance(module, nn.modules.conv._ConvNd)
            if conv and (module.padding_mode != "zeros" or module.padding == "same"):
                return False
            allowed |= {f"{name}.{entry}" for entry in ("weight", "bias", "running_mean", "running_var")}
        elif type(module) is nn.Flatten:
            if module.start_dim != 1 or module.end_dim != -1:
                return False
        elif type(module) not in PER_CHANNEL or getattr(module, "return_indices", False):
            return False
    return set(float_entries) <= allowed


class SampleMajorSequential:
    """Runs a `supports_sample_major` Sequential at P points (see the module docstring)."""

    def __init__(self, model: nn.Sequential, parameter_names: list[str]):
        # Dropout on (the layers' own weights are not read); max-pooling as the view runs it (`pooling.py`)
        self.layers = [faster_pooling(layer) or layer for layer in copy.deepcopy(model).train()]
        # A pooling layer's spatial dims: on an input without the batch and channel axes besides them, torch would
        # pool across the channel axis, i.e. across points here (the view then runs the model).
        self.pooled_dims = [_POOLED_DIMS.get(type(layer)) for layer in model]
        named = dict(model.named_parameters())
        self.shapes = [named[name].shape for name in parameter_names]
        self.where = {name: i for i, name in enumerate(parameter_names)}  # "3.weight" -> index
        self.largest = 0  # elements of the largest activation of one point, known after the first call

    def __call__(self, per_point: list[list[Tensor]], rows: Tensor, x: Tensor) -> Tensor:
        """Outputs [P, N, ...] at the coefficient rows [P, K] for the input x [N, ...] shared by all points."""
        mixed = mixed_parameters(per_point, rows, self.shapes)  # each [P, *shape]
        points = rows.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // self.largest) if self.largest else points
        if points <= chunk:
            return self._run(mixed, points, x)
        return torch.cat([self._run([m[start:start + chunk] for m in mixed], min(chunk, points - start), x)
                          for start in range(0, points, chunk)])

    def _run(self, mixed: list[Tensor], points: int, x: Tensor) -> Tensor:
        shared = True  # x is the caller's input, the same for every point
        for index, layer in enumerate(self.layers):
            weight, bias = (mixed[i] if (i := self.where.get(f"{index}.{name}")) is not None else None
                            for name in ("weight", "bias"))
            if isinstance(layer, nn.modules.conv._ConvNd):
                x = self._conv(layer, x, weight, bias, points, shared)
                if x.dim() == 4 and x.device.type == "cpu" and x.shape[2] * x.shape[3] <= SMALL_MAP:
                    x = x.contiguous(memory_format=torch.channels_last)  # see the module docstring
            elif isinstance(layer, nn.Linear):
                x = self._linear(x, weight, bias, points, shared)
            else:
                if shared:
                    x = _repeated(x, points)
                if (dims := self.pooled_dims[index]) is not None and x.dim() != dims + 2:
                    raise NotImplementedError("pooling over an input without its channel axis: the view runs this")
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    x = F.batch_norm(x, None, None, None if weight is None else weight.reshape(-1),
                                     None if bias is None else bias.reshape(-1), True, 0.0, layer.eps)
                else:
                    x = layer(x)
            shared = False
            self.largest = max(self.largest, x.numel() // points)
        if shared:
            x = _repeated(x, points)
        return x.reshape(x.shape[0], points, -1, *x.shape[2:]).transpose(0, 1)

    @staticmethod
    def _conv(layer: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None, points: int,
              shared: bool) -> Tensor:
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        groups = layer.groups
        if shared and groups != 1:
            x, shared = _repeated(x, points), False
        return conv(x, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                    layer.stride, layer.padding, layer.dilation, groups if shared else points * groups)

    @staticmethod
    def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, points: int, shared: bool) -> Tensor:
        if x.dim() != 2:
            raise NotImplementedError("a Linear on inputs with more than 2 dims: the view runs this model")
        if shared:  # one product with the points' weights stacked along the outputs
            return F.linear(x, weight.reshape(-1, weight.shape[2]), None if bias is None else bias.reshape(-1))
        per_point = x.reshape(x.shape[0], points, -1).transpose(0, 1)  # [P, N, Din]
        y = (torch.bmm(per_point, weight.transpose(1, 2)) if bias is None
             else torch.baddbmm(bias.unsqueeze(1), per_point, weight.transpose(1, 2)))
        return y.transpose(0, 1).reshape(x.shape[0], -1)


def _repeated(x: Tensor, points: int) -> Tensor:
    """[N, C, ...] -> [N, P·C, ...], the same channels for every point."""
    return x.unsqueeze(1).expand(x.shape[0], points, *x.shape[1:]).reshape(x.shape[0], -1, *x.shape[2:])
