"""Activation matching (Ainsworth et al. 2023, §3.1; Li et al. 2016): align units whose activations correlate.

For every group, stream over the data the first and second moments of the activations it permutes in both
models (every fx node carrying the group; spatial positions and flattened blocks count as samples), then

    corr[i, j] = cov(a_i, b_j) / (σ(a_i) σ(b_j)),   C = Σ_nodes corr,   π = argmax_σ Σ_i C[i, σ(i)]

— one LAP per group, no iteration. Groups no traced activation carries (inside leaf modules such as
nn.MultiheadAttention) stay in place, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.fx
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..engine.batches import Batches
from .derive import trace
from .permutation import Permutation
from .spec import PermutationSpec, SpecError, check_same_architecture


class _Recorder(torch.fx.Interpreter):
    """Runs a traced model and hands the outputs of chosen nodes to `sink(name, tensor)`."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str], sink) -> None:
        super().__init__(gm)
        self.wanted, self.sink = wanted, sink

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        if node.name in self.wanted:
            self.sink(node.name, result)
        return result


def units_as_columns(x: Tensor, dim: int, inner: int) -> Tensor:
    """[samples, n]: the n units of axis `dim` (blocks of `inner`) as columns, every other entry as a sample."""
    moved = torch.movedim(x, dim, -1)
    n = moved.shape[-1] // inner
    return moved.reshape(-1, n, inner).transpose(1, 2).reshape(-1, n)


class _Moments:
    """Streaming Σa, Σb, Σa², Σb², Σabᵀ in float64."""

    def __init__(self, n: int) -> None:
        self.count = 0
        self.sa, self.sb = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.saa, self.sbb = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self, eps: float = 1e-12) -> Tensor:
        mean_a, mean_b = self.sa / self.count, self.sb / self.count
        std_a = (self.saa / self.count - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sbb / self.count - mean_b**2).clamp_min(0).sqrt()
        cov = self.sab / self.count - torch.outer(mean_a, mean_b)
        return cov / (torch.outer(std_a, std_b) + eps)


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    spec: PermutationSpec | None = None,
    max_batches: int | None = None,
) -> Permutation:
    """Permutation of model_b's units maximising the summed correlation of activations with model_a's.

    data: `(inputs, targets)` tensors or an iterable of such batches (targets are not used); its first batch
    is the example input for tracing. A given `spec` must be the derived one (its groups name the activations).
    """
    check_same_architecture(model_a, model_b)
    batches = Batches(data, "data")
    example = batches.first[0]
    traced_a, traced_b = trace(model_a, example), trace(model_b, example)
    if spec is not None and spec.groups != traced_a.spec.groups:
        raise SpecError("activation_matching needs the derived spec (its groups name the activations)")
    hidden = [group for group, nodes in traced_a.activations.items() if not nodes]
    if hidden:
        warnings.warn(
            f"activation_matching leaves {len(hidden)} group(s) in place that no traced activation carries (units "
            f"within attention heads: {hidden[:3]}); weight_matching aligns them",
            stacklevel=2,
        )
    carriers = {name: (group, dim, inner) for group, nodes in traced_a.activations.items() for name, dim, inner in nodes}
    sizes = traced_a.spec.sizes(model_a.state_dict())
    moments: dict[str, _Moments] = {}
    outputs: dict[str, dict[str, Tensor]] = {"a": {}, "b": {}}
    recorders = {
        side: _Recorder(t.graph_module, set(carriers), lambda name, x, side=side: outputs[side].__setitem__(name, x))
        for side, t in (("a", traced_a), ("b", traced_b))
    }
    with torch.no_grad():
        for index, (inputs, _) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            for recorder in recorders.values():
                recorder.run(*args)
            for name, (group, dim, inner) in carriers.items():
                a = units_as_columns(outputs["a"][name], dim, inner)
                b = units_as_columns(outputs["b"][name], dim, inner)
                moments.setdefault(name, _Moments(sizes[group])).add(a, b)
    perms: dict[str, Tensor] = {group: torch.arange(sizes[group]) for group in hidden}
    for group, nodes in traced_a.activations.items():
        if not nodes:
            continue
        cost = sum(moments[name].correlation() for name, _, _ in nodes)
        perms[group] = torch.as_tensor(linear_sum_assignment(np.asarray(cost), maximize=True)[1], dtype=torch.long)
    return Permutation(traced_a.spec, perms)
