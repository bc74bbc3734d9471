"""Permutation specs: which (tensor, axis) pairs each hidden-unit permutation acts on (DESIGN §4).

A spec is plain data, printable and writable by hand:

    PermutationSpec({"fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]})

An axis may hold its group's units as contiguous blocks (`inner` > 1): after `flatten` of a [N, C, H, W] map,
channel c owns the C·H·W features c·HW … (c+1)·HW − 1, so `("fc.weight", 1, 16)` permutes blocks of 16.
Permuting a group by π maps unit i of the new model to unit π[i] of the old one, on every axis of the group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class SpecError(ValueError):
    """A spec that does not fit a model, or a model whose spec cannot be derived."""


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor (a state_dict key) permuted by a group, in blocks of `inner` entries."""

    tensor: str
    dim: int
    inner: int = 1

    def __str__(self) -> str:
        return f"{self.tensor}[{self.dim}]" + (f"×{self.inner}" if self.inner != 1 else "")


AxisLike = Axis | tuple[str, int] | tuple[str, int, int]


@dataclass
class PermutationSpec:
    """groups: group name -> the axes it permutes. `example_input` (optional) serves as the probe batch."""

    groups: dict[str, list[Axis]]
    example_input: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def __init__(
        self,
        groups: Mapping[str, Iterable[AxisLike]],
        example_input: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        self.groups = {name: [a if isinstance(a, Axis) else Axis(*a) for a in axes] for name, axes in groups.items()}
        self.example_input = None if example_input is None else as_args(example_input)
        seen: dict[tuple[str, int], str] = {}
        for name, axes in self.groups.items():
            if not axes:
                raise SpecError(f"group {name!r} permutes no axis")
            for axis in axes:
                if axis.inner < 1:
                    raise SpecError(f"group {name!r}: {axis} has inner block size {axis.inner} < 1")
                other = seen.setdefault((axis.tensor, axis.dim), name)
                if other != name:
                    raise SpecError(f"{axis.tensor} axis {axis.dim} is claimed by groups {other!r} and {name!r}")

    def axes_of(self, tensor: str) -> dict[int, tuple[str, int]]:
        """dim -> (group, inner) for every permuted axis of `tensor`."""
        return {a.dim: (g, a.inner) for g, axes in self.groups.items() for a in axes if a.tensor == tensor}

    def tensors(self) -> list[str]:
        """Every tensor named by the spec, in first-mention order."""
        return list(dict.fromkeys(a.tensor for axes in self.groups.values() for a in axes))

    def sizes(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        """Number of units of every group, checked against `state` (a state_dict); raises SpecError on mismatch."""
        sizes: dict[str, int] = {}
        for name, axes in self.groups.items():
            for axis in axes:
                if axis.tensor not in state:
                    raise SpecError(f"group {name!r}: the model has no tensor {axis.tensor!r}")
                shape = state[axis.tensor].shape
                if not 0 <= axis.dim < len(shape):
                    raise SpecError(f"group {name!r}: {axis.tensor} has shape {tuple(shape)}, no axis {axis.dim}")
                if shape[axis.dim] % axis.inner:
                    raise SpecError(f"group {name!r}: {axis} — size {shape[axis.dim]} is not a multiple of {axis.inner}")
                n = shape[axis.dim] // axis.inner
                if sizes.setdefault(name, n) != n:
                    raise SpecError(f"group {name!r}: {axis} has {n} units, other axes of the group have {sizes[name]}")
        return sizes

    def __str__(self) -> str:
        lines = [f"PermutationSpec with {len(self.groups)} group(s)"]
        for name, axes in self.groups.items():
            lines.append(f"  {name}: " + ", ".join(str(a) for a in axes))
        return "\n".join(lines)


def as_args(example_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A model's positional inputs as a tuple."""
    return (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise SpecError unless both models have the same module types, tensor names and shapes."""
    types_a = [(n, type(m).__name__) for n, m in model_a.named_modules()]
    types_b = [(n, type(m).__name__) for n, m in model_b.named_modules()]
    if types_a != types_b:
        diff = next(((a, b) for a, b in zip(types_a, types_b) if a != b), (types_a[len(types_b):], types_b[len(types_a):]))
        raise SpecError(f"models have different architectures: module {diff[0]} vs {diff[1]}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if list(state_a) != list(state_b):
        missing = sorted(set(state_a) ^ set(state_b))
        raise SpecError(f"models have different architectures: tensors not in both: {missing[:5]}")
    for key, tensor in state_a.items():
        if tensor.shape != state_b[key].shape:
            raise SpecError(
                f"models have different architectures: {key} is {tuple(tensor.shape)} vs {tuple(state_b[key].shape)}"
            )


def parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable tensors (the weight-matching objective uses these, not buffers)."""
    return {name for name, _ in model.named_parameters()}


def unit_index(perm: Tensor, inner: int) -> Tensor:
    """Index along an axis of n blocks of `inner` entries that moves block perm[i] to block i."""
    if inner == 1:
        return perm
    return (perm[:, None] * inner + torch.arange(inner, device=perm.device)).reshape(-1)
