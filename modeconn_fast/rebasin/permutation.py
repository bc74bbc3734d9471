"""A set of hidden-unit permutations, one per group of a spec, and its verified application to a model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .spec import PermutationSpec, SpecError, as_args, axis_index


class FunctionChangedError(RuntimeError):
    """The permuted model does not compute the same function as the original: the spec is wrong for it."""


@dataclass
class Permutation:
    """perms[group][i] = the unit of the original model that becomes unit i (Ainsworth et al. 2023, §3).

    Results of a matching also carry `iterations` (sweeps, or STE steps) and `objective_history`
    (Σ_ℓ ⟨W_A^ℓ, π(W_B^ℓ)⟩ after each sweep, the first entry before any) or `loss_history` (STE midpoint losses).
    """

    spec: PermutationSpec
    perms: dict[str, Tensor]
    objective_history: list[float] = field(default_factory=list)
    iterations: int = 0
    loss_history: list[float] = field(default_factory=list)

    @classmethod
    def identity(cls, spec: PermutationSpec, state: Mapping[str, Tensor]) -> Permutation:
        return cls(spec, {g: torch.arange(n) for g, n in spec.sizes(state).items()})

    @property
    def objective(self) -> float:
        return self.objective_history[-1]

    def inverse(self) -> Permutation:
        return Permutation(self.spec, {g: torch.argsort(p) for g, p in self.perms.items()})

    def permute_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A new state dict with every axis of the spec permuted; tensors the spec does not name are shared."""
        self.check(state)
        out = dict(state)
        for tensor in self.spec.tensors():
            out[tensor] = self.permute_tensor(tensor, state[tensor])
        return out

    def check(self, state: Mapping[str, Tensor]) -> None:
        """Raise SpecError unless the spec fits `state`, every permutation has its group's size, and those of
        head-structured groups move whole heads in one order."""
        sizes = self.spec.sizes(state)
        for group, perm in self.perms.items():
            if group not in sizes or perm.shape != (sizes[group],):
                raise SpecError(f"permutation of group {group!r} has shape {tuple(perm.shape)}, expected ({sizes.get(group)},)")
        self.spec.check_heads(self.perms)

    def permute_tensor(self, name: str, value: Tensor) -> Tensor:
        """`value` (the tensor called `name` in the spec) with its permuted axes permuted: one index_select per
        axis, over a view that merges the axes after it where the tensor is contiguous (rows of contiguous
        entries: a convolution weight's input axis 1.4× faster than over its 4-d shape)."""
        for axis, group in self.spec.axes_of(name):
            index = axis_index(self.perms[group].to(value.device), axis, value.shape[axis.dim])
            shape = value.shape
            if value.is_contiguous() and value.dim() > axis.dim + 2:  # the axes after it as one
                value = value.reshape(*shape[: axis.dim + 1], -1)
            value = value.index_select(axis.dim, index).reshape(shape)
        return value

    def apply(
        self, model: nn.Module, *, probe: Tensor | Sequence[Tensor] | None = None, rtol: float = 1e-5
    ) -> nn.Module:
        """A new model with the permutation applied (parameters and buffers); `model` is left untouched.

        The result is checked on a probe batch (`probe`, else the spec's example input) in eval mode:
        ‖f_π(x) − f(x)‖ ≤ rtol·‖f(x)‖, else FunctionChangedError.
        """
        args = as_args(probe) if probe is not None else self.spec.example_input
        if args is None:
            raise SpecError("no probe batch to verify the permuted model: pass probe= or derive the spec with an example input")
        permuted = copy.deepcopy(model)
        permuted.load_state_dict(self.permute_state(model.state_dict()))
        verify_same_function(model, permuted, args, rtol=rtol)
        return permuted


def verify_same_function(model: nn.Module, other: nn.Module, args: tuple[Tensor, ...], *, rtol: float = 1e-5) -> None:
    """Raise FunctionChangedError unless both models give the same outputs on `args` (eval mode, relative norm)."""
    modes = [(m, m.training) for m in (model, other)]
    try:
        with torch.no_grad():
            expected, _ = tree_flatten(model.eval()(*args))
            actual, _ = tree_flatten(other.eval()(*args))
    finally:
        for m, training in modes:
            m.train(training)
    for e, a in zip(expected, actual):
        if not isinstance(e, Tensor):
            continue
        e, a = e.double(), a.double()
        error = (e - a).norm().item()
        scale = e.norm().item()
        if not error <= rtol * max(scale, torch.finfo(torch.float32).tiny):
            raise FunctionChangedError(
                f"the permuted model computes a different function: relative error {error / max(scale, 1e-30):.3g} > {rtol:g}"
            )
