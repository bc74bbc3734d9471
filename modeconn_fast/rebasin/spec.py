"""Permutation specs: which (tensor, axis) pairs each hidden-unit permutation acts on (DESIGN §4).

A spec is plain data, printable and writable by hand:

    PermutationSpec({"fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]})

An axis may hold its group's units as contiguous blocks (`inner` > 1): after `flatten` of a [N, C, H, W] map,
channel c owns the C·H·W features c·HW … (c+1)·HW − 1, so `("fc.weight", 1, 16)` permutes blocks of 16.
An axis may also cover only a slice `start:stop` of its dimension, so that one packed tensor can hold several
groups: `nn.MultiheadAttention` keeps q, k and v in `in_proj_weight` [3E, E], so the rows of q and k are
`("attn.in_proj_weight", 0, 1, 0, E)` and `("attn.in_proj_weight", 0, 1, E, 2E)` of one group.
Permuting a group by π maps unit i of the new model to unit π[i] of the old one, on every axis of the group.

Attention heads: the units of a group may come in `num_heads` blocks (heads) that a permutation may only move
as whole blocks, and several groups may have to move their heads together. `Heads(("attn.qk", "attn.v"), 4)`
says: the q/k group and the v group of a 4-head attention permute units within each head freely, each its own
way, and move heads only all in the same order (q·k of every head and head h's values stay together);
`move=False` keeps every head in place.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class SpecError(ValueError):
    """A spec that does not fit a model, or a model whose spec cannot be derived."""


@dataclass(frozen=True)
class Axis:
    """One axis of one tensor (a state_dict key) permuted by a group, in blocks of `inner` entries, over the
    entries `start:stop` of that axis (stop None: to its end)."""

    tensor: str
    dim: int
    inner: int = 1
    start: int = 0
    stop: int | None = None

    def __str__(self) -> str:
        part = f"[{self.start}:{'' if self.stop is None else self.stop}]" if (self.start, self.stop) != (0, None) else ""
        return f"{self.tensor}[{self.dim}]{part}" + (f"×{self.inner}" if self.inner != 1 else "")

    def bounds(self, size: int) -> tuple[int, int]:
        """(start, stop) of the slice in an axis of `size` entries."""
        return self.start, size if self.stop is None else self.stop


AxisLike = Axis | tuple[str, int] | tuple[str, int, int] | tuple[str, int, int, int, int]


@dataclass(frozen=True)
class Heads:
    """Groups whose units form `num_heads` equal blocks that move only as whole blocks, all in one order."""

    groups: tuple[str, ...]
    num_heads: int
    move: bool = True


@dataclass
class PermutationSpec:
    """groups: group name -> the axes it permutes; heads: name -> Heads, the head-structured groups.
    `example_input` (optional) serves as the probe batch."""

    groups: dict[str, list[Axis]]
    heads: dict[str, Heads]
    example_input: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def __init__(
        self,
        groups: Mapping[str, Iterable[AxisLike]],
        example_input: Tensor | Sequence[Tensor] | None = None,
        heads: Mapping[str, Heads] | None = None,
    ) -> None:
        self.groups = {name: [a if isinstance(a, Axis) else Axis(*a) for a in axes] for name, axes in groups.items()}
        self.heads = dict(heads or {})
        self.example_input = None if example_input is None else as_args(example_input)
        seen: dict[tuple[str, int], list[tuple[Axis, str]]] = {}
        for name, axes in self.groups.items():
            if not axes:
                raise SpecError(f"group {name!r} permutes no axis")
            for axis in axes:
                if axis.inner < 1:
                    raise SpecError(f"group {name!r}: {axis} has inner block size {axis.inner} < 1")
                if axis.start < 0 or (axis.stop is not None and axis.stop <= axis.start):
                    raise SpecError(f"group {name!r}: {axis} is an empty or negative slice")
                for other, other_name in seen.setdefault((axis.tensor, axis.dim), []):
                    if _overlap(axis, other):
                        raise SpecError(f"{axis.tensor} axis {axis.dim} is claimed by groups {other_name!r} and {name!r}")
                seen[(axis.tensor, axis.dim)].append((axis, name))
        tied: dict[str, str] = {}
        for name, tie in self.heads.items():
            if tie.num_heads < 1:
                raise SpecError(f"heads {name!r}: num_heads {tie.num_heads} < 1")
            for group in tie.groups:
                if group not in self.groups:
                    raise SpecError(f"heads {name!r}: no group {group!r}")
                if tied.setdefault(group, name) != name:
                    raise SpecError(f"group {group!r} is in heads {tied[group]!r} and {name!r}")

    def axes_of(self, tensor: str) -> list[tuple[Axis, str]]:
        """(axis, group) for every permuted axis (or slice of one) of `tensor`."""
        return [(a, g) for g, axes in self.groups.items() for a in axes if a.tensor == tensor]

    def check_heads(self, perms: Mapping[str, Tensor]) -> None:
        """Raise SpecError unless the permutations of head-structured groups move whole heads, all in one order."""
        for name, tie in self.heads.items():
            orders = []
            for group in tie.groups:
                perm = perms[group]
                blocks = perm.reshape(tie.num_heads, -1) // (perm.numel() // tie.num_heads)
                if not (blocks == blocks[:, :1]).all():
                    raise SpecError(f"the permutation of group {group!r} mixes units of different heads of {name!r}")
                orders.append(blocks[:, 0])
            if any(not torch.equal(o, orders[0]) for o in orders[1:]):
                raise SpecError(f"the groups {tie.groups} of {name!r} move the heads in different orders")
            if not tie.move and not torch.equal(orders[0], torch.arange(tie.num_heads)):
                raise SpecError(f"the heads of {name!r} must stay in place (move=False)")

    def tensors(self) -> list[str]:
        """Every tensor named by the spec, in first-mention order."""
        return list(dict.fromkeys(a.tensor for axes in self.groups.values() for a in axes))

    def sizes(self, state: Mapping[str, Tensor]) -> dict[str, int]:
        """Number of units of every group, checked against `state` (a state_dict); raises SpecError on mismatch."""
        sizes: dict[str, int] = {}
        for name, axes in self.groups.items():
            for axis in axes:
                if axis.tensor not in state:
                    near = difflib.get_close_matches(axis.tensor, list(state), n=3)
                    hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
                    raise SpecError(
                        f"group {name!r}: the model has no tensor {axis.tensor!r}{hint}; a spec names tensors by their "
                        "state_dict() keys: fix the spec, or derive it with permutation_spec(model, example_input)"
                    )
                shape = state[axis.tensor].shape
                if not 0 <= axis.dim < len(shape):
                    raise SpecError(f"group {name!r}: {axis.tensor} has shape {tuple(shape)}, no axis {axis.dim}")
                start, stop = axis.bounds(shape[axis.dim])
                if stop > shape[axis.dim]:
                    raise SpecError(f"group {name!r}: {axis} ends past the axis's {shape[axis.dim]} entries")
                if (stop - start) % axis.inner:
                    raise SpecError(f"group {name!r}: {axis} — size {stop - start} is not a multiple of {axis.inner}")
                n = (stop - start) // axis.inner
                if sizes.setdefault(name, n) != n:
                    raise SpecError(f"group {name!r}: {axis} has {n} units, other axes of the group have {sizes[name]}")
        for name, tie in self.heads.items():
            for group in tie.groups:
                if sizes[group] % tie.num_heads:
                    raise SpecError(f"heads {name!r}: group {group!r} has {sizes[group]} units, not {tie.num_heads} equal heads")
        return sizes

    def __str__(self) -> str:
        lines = [f"PermutationSpec with {len(self.groups)} group(s)"]
        for name, axes in self.groups.items():
            lines.append(f"  {name}: " + ", ".join(str(a) for a in axes))
        for name, tie in self.heads.items():
            how = "heads move together" if tie.move else "heads stay in place"
            lines.append(f"  heads {name}: {tie.num_heads} heads of {', '.join(tie.groups)} ({how})")
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
    check_same_states(model_a.state_dict(), model_b.state_dict())


def check_same_states(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Raise SpecError unless both state dicts have the same tensor names and shapes, devices and dtypes."""
    if list(state_a) != list(state_b):
        missing = sorted(set(state_a) ^ set(state_b))
        raise SpecError(f"models have different architectures: tensors not in both: {missing[:5]}")
    for key, tensor in state_a.items():
        if tensor.shape != state_b[key].shape:
            raise SpecError(
                f"models have different architectures: {key} is {tuple(tensor.shape)} vs {tuple(state_b[key].shape)}"
            )
    check_same_placement(state_a, state_b)


def check_same_placement(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Raise SpecError unless every tensor of both state dicts has one device and one dtype per key."""
    for key, tensor in state_a.items():
        other = state_b[key]
        if tensor.device != other.device:
            raise SpecError(
                f"{key} is on {tensor.device} in model_a but on {other.device} in model_b: move both models to one "
                f"device first, e.g. model_b.to({str(tensor.device)!r})"
            )
        if tensor.dtype != other.dtype:
            raise SpecError(
                f"{key} is {tensor.dtype} in model_a but {other.dtype} in model_b: convert both models to one dtype "
                f"first, e.g. model_b.to({tensor.dtype})"
            )


def _overlap(a: Axis, b: Axis) -> bool:
    a_stop = float("inf") if a.stop is None else a.stop
    b_stop = float("inf") if b.stop is None else b.stop
    return a.start < b_stop and b.start < a_stop


def unit_index(perm: Tensor, inner: int) -> Tensor:
    """Index along an axis of n blocks of `inner` entries that moves block perm[i] to block i."""
    if inner == 1:
        return perm
    return (perm[:, None] * inner + torch.arange(inner, device=perm.device)).reshape(-1)


def axis_index(perm: Tensor, axis: Axis, size: int) -> Tensor:
    """Index along an axis of `size` entries that permutes the slice of `axis` by `perm` and keeps the rest."""
    start, stop = axis.bounds(size)
    index = unit_index(perm, axis.inner) + start
    if (start, stop) == (0, size):
        return index
    return torch.cat([torch.arange(start, device=perm.device), index, torch.arange(stop, size, device=perm.device)])
