"""Curve training as the 2018 reference code runs it (Garipov et al., dnn-mode-connectivity), ported to a
`nn.Sequential` of Conv2d / BatchNorm2d / Linear layers.

Every such layer becomes a "curve module" holding one weight per control point and computing
W(t) = Σ_k c_k(t) W_k in every forward; the regulariser is ½·wd·Σ_modules Σ ‖W(t)‖² over the weights and biases
those modules computed; BatchNorm runs in train mode on each batch's statistics (updating its running
statistics, which the loss never reads). One t ~ U[0, 1] per minibatch, SGD with momentum and no SGD decay.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bernstein(t: Tensor, control_points: int) -> Tensor:
    """The reference's Bezier coefficients: C(n, k) tᵏ (1 − t)ⁿ⁻ᵏ, n = control_points − 1."""
    n = control_points - 1
    k = torch.arange(control_points, dtype=t.dtype)
    binomials = torch.tensor([math.comb(n, i) for i in range(control_points)], dtype=t.dtype)
    return binomials * t.pow(k) * (1 - t).pow(n - k)


class CurveLayer(nn.Module):
    """One layer's weights at every control point; `weights_at(c)` mixes them and records Σ ‖W(t)‖²."""

    def __init__(self, layers: list[nn.Module], fixed: list[bool]):
        super().__init__()
        self.names = [name for name, p in layers[0].named_parameters() if p is not None]
        for name in self.names:
            for k, (layer, frozen) in enumerate(zip(layers, fixed)):
                value = getattr(layer, name).detach().clone()
                self.register_parameter(f"{name}_{k}", nn.Parameter(value, requires_grad=not frozen))
        self.count = len(layers)
        self.l2: Tensor | float = 0.0

    def weights_at(self, coeffs: Tensor) -> dict[str, Tensor]:
        mixed = {}
        self.l2 = 0.0
        for name in self.names:
            value = sum(getattr(self, f"{name}_{k}") * coeffs[k] for k in range(self.count))
            mixed[name] = value
            self.l2 = self.l2 + (value ** 2).sum()
        return mixed


class CurveLinear(CurveLayer):
    def forward(self, x: Tensor, coeffs: Tensor) -> Tensor:
        w = self.weights_at(coeffs)
        return F.linear(x, w["weight"], w.get("bias"))


class CurveConv2d(CurveLayer):
    def __init__(self, layers: list[nn.Conv2d], fixed: list[bool]):
        super().__init__(layers, fixed)
        self.options = dict(stride=layers[0].stride, padding=layers[0].padding, dilation=layers[0].dilation,
                            groups=layers[0].groups)

    def forward(self, x: Tensor, coeffs: Tensor) -> Tensor:
        w = self.weights_at(coeffs)
        return F.conv2d(x, w["weight"], w.get("bias"), **self.options)


class CurveBatchNorm2d(CurveLayer):
    def __init__(self, layers: list[nn.BatchNorm2d], fixed: list[bool]):
        super().__init__(layers, fixed)
        self.eps, self.momentum = layers[0].eps, layers[0].momentum
        self.register_buffer("running_mean", layers[0].running_mean.clone())
        self.register_buffer("running_var", layers[0].running_var.clone())

    def forward(self, x: Tensor, coeffs: Tensor) -> Tensor:
        w = self.weights_at(coeffs)
        return F.batch_norm(x, self.running_mean, self.running_var, w.get("weight"), w.get("bias"), True,
                            self.momentum, self.eps)


CURVE_LAYERS = {nn.Linear: CurveLinear, nn.Conv2d: CurveConv2d, nn.BatchNorm2d: CurveBatchNorm2d}


class CurveNet(nn.Module):
    """The reference's curve model of a Sequential: curve layers take the coefficients, the others run as they are."""

    def __init__(self, control_points: list[nn.Sequential], fixed: list[bool]):
        super().__init__()
        layers = []
        for parts in zip(*control_points):
            kind = CURVE_LAYERS.get(type(parts[0]))
            layers.append(kind(list(parts), fixed) if kind is not None else parts[0])
        self.layers = nn.ModuleList(layers)
        self.count = len(control_points)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        coeffs = bernstein(t, self.count).to(x.dtype)
        for layer in self.layers:
            x = layer(x, coeffs) if isinstance(layer, CurveLayer) else layer(x)
        return x

    def l2(self) -> Tensor:
        return sum(layer.l2 for layer in self.layers if isinstance(layer, CurveLayer))


def train_steps(net: CurveNet, batches: list[tuple[Tensor, Tensor]], *, lr: float, momentum: float,
                weight_decay: float, seed: int) -> list[float]:
    """The reference's training loop over `batches` (one t per batch from a generator seeded with `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    net.train()
    losses = []
    for inputs, targets in batches:
        t = torch.rand(1, generator=generator, dtype=torch.float64)[0]
        outputs = net(inputs, t)
        loss = F.cross_entropy(outputs, targets) + 0.5 * weight_decay * net.l2()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
