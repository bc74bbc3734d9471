"""A weight subspace: K basis state dicts, stacked, and the rule that mixes them (DESIGN §1).

Every object of mode connectivity (a linear path, a Bezier curve, a plane, a simplex, an ensemble) is a basis
θ_0 … θ_{K−1} plus coefficient rows c[p] ∈ R^K; point p has the weights θ(p) = Σ_k c[p,k] θ_k.
`Basis` holds the K state dicts as one stacked tensor [K, *shape] per entry.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .ops import mix

StateLike = Union[nn.Module, Mapping[str, Tensor]]


def _state_dict(member: StateLike) -> dict[str, Tensor]:
    if isinstance(member, nn.Module):
        return member.state_dict()
    if isinstance(member, Mapping):
        return dict(member)
    raise TypeError(f"a basis member must be an nn.Module or a state dict, got {type(member).__name__}")


def _shape(shape: torch.Size) -> str:
    return str(tuple(shape))


class Basis:
    """K state dicts stacked entry by entry.

    `stacked[name]` is a Tensor[K, *shape] for every floating-point entry (parameters and float buffers
    such as BatchNorm running statistics); `constants[name]` holds the other entries (integer buffers like
    `num_batches_tracked`), taken from the first member.
    """

    def __init__(self, stacked: dict[str, Tensor], constants: dict[str, Tensor] | None = None):
        sizes = {t.shape[0] for t in stacked.values()}
        if len(sizes) > 1:
            raise ValueError(f"every stacked entry needs the same number of basis members, got sizes {sorted(sizes)}")
        self.stacked = stacked
        self.constants = constants or {}
        self.size = sizes.pop() if sizes else 0

    @classmethod
    def from_members(cls, members: Sequence[StateLike], *, like: nn.Module | None = None) -> "Basis":
        """Stack models or state dicts. With `like`, check names and shapes against that model first."""
        if len(members) == 0:
            raise ValueError("a basis needs at least one member (a model or a state dict)")
        states = [_state_dict(m) for m in members]
        reference = like.state_dict() if like is not None else states[0]
        reference_name = "the model" if like is not None else "basis member 0"
        for index, state in enumerate(states):
            _check_same_entries(reference, state, reference_name, f"basis member {index}")
        stacked, constants = {}, {}
        for name, ref in reference.items():
            if torch.is_floating_point(ref):
                stacked[name] = torch.stack([s[name].detach().to(ref.device, ref.dtype) for s in states])
            else:
                constants[name] = states[0][name].detach().to(ref.device)
        basis = cls(stacked, constants)
        basis.warn_if_not_finite()
        return basis

    def nonfinite_members(self) -> list[int]:
        """Indices of the members with NaN or ±inf in some entry."""
        finite = torch.ones(self.size, dtype=torch.bool)
        for tensor in self.stacked.values():
            finite &= torch.isfinite(tensor.reshape(self.size, -1)).all(dim=1).cpu()
        return (~finite).nonzero().flatten().tolist()

    def with_nonfinite_zeroed(self) -> "Basis":
        """A copy with NaN and ±inf replaced by 0, so that they do not spread to points that do not use them
        (0 · NaN is NaN); the engine marks the points that do use such a member as NaN."""
        stacked = {n: torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for n, t in self.stacked.items()}
        return Basis(stacked, dict(self.constants))

    def warn_if_not_finite(self) -> None:
        """Warn, naming member and entry, where a basis tensor holds NaN or ±inf."""
        for name, tensor in self.stacked.items():
            finite = torch.isfinite(tensor.reshape(self.size, -1)).all(dim=1)
            for k in (~finite).nonzero().flatten().tolist():
                warnings.warn(f"basis member {k} has non-finite values in '{name}': points with a nonzero "
                              f"coefficient on it give NaN")

    def check_compatible(self, model: nn.Module) -> None:
        """Raise ValueError naming the entry and both shapes where `model` and this basis disagree."""
        reference = model.state_dict()
        own = {name: t[0] for name, t in self.stacked.items()} | self.constants
        _check_same_entries(reference, own, "the model", "the basis")
        for name, tensor in self.stacked.items():
            if (tensor.dtype, tensor.device) != (reference[name].dtype, reference[name].device):
                raise ValueError(f"'{name}' is {tensor.dtype} on {tensor.device} in the basis but "
                                 f"{reference[name].dtype} on {reference[name].device} in the model: use "
                                 f"basis.to(device, dtype) or model.to(...) first")

    def transform(self, matrix: Tensor) -> "Basis":
        """The basis whose member j is Σ_k matrix[j, k] θ_k (e.g. (θ_0, θ_1 − θ_0, θ_2 − θ_0) for a plane)."""
        matrix = torch.as_tensor(matrix)
        if matrix.dim() != 2 or matrix.shape[1] != self.size:
            raise ValueError(f"transform needs a matrix of shape [J, {self.size}], got {_shape(matrix.shape)}")
        stacked = {n: mix(matrix.to(t.device, t.dtype), t) for n, t in self.stacked.items()}
        return Basis(stacked, dict(self.constants))

    def point(self, coeffs: Tensor) -> dict[str, Tensor]:
        """The state dict of one point: Σ_k coeffs[k] θ_k (constants from the first member)."""
        coeffs = torch.as_tensor(coeffs)
        if coeffs.shape != (self.size,):
            raise ValueError(f"a point of this basis needs {self.size} coefficients, got shape {_shape(coeffs.shape)}")
        state = {n: mix(coeffs.to(t.device, t.dtype)[None], t)[0] for n, t in self.stacked.items()}
        return state | {n: t.clone() for n, t in self.constants.items()}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Basis":
        stacked = {n: t.to(device=device, dtype=dtype) for n, t in self.stacked.items()}
        return Basis(stacked, {n: t.to(device=device) for n, t in self.constants.items()})

    def __repr__(self) -> str:
        count = sum(t[0].numel() for t in self.stacked.values())
        return f"Basis(members={self.size}, entries={len(self.stacked)}, values_per_member={count})"


def as_basis(basis: "Basis | Sequence[StateLike]", model: nn.Module) -> Basis:
    """Accept a Basis or a sequence of models / state dicts; check it against `model`."""
    if isinstance(basis, Basis):
        basis.check_compatible(model)
        return basis
    if isinstance(basis, (nn.Module, Mapping)):
        raise TypeError("basis must be a sequence of models or state dicts (e.g. [model_a, model_b]) or a Basis")
    members = list(basis)
    _check_same_dtypes(model.state_dict(), [_state_dict(m) for m in members])
    return Basis.from_members(members, like=model)


def _check_same_dtypes(reference: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise ValueError naming both dtypes where a member's floating entry differs from the model's (the engine
    converts nothing silently: a float32 member in a float64 model would be computed at another precision)."""
    for index, state in enumerate(states):
        for name, ref in reference.items():
            tensor = state.get(name)
            if tensor is not None and torch.is_floating_point(ref) and tensor.dtype != ref.dtype:
                raise ValueError(f"basis member {index}'s '{name}' is {tensor.dtype} but the model's is {ref.dtype}: "
                                 f"convert the members or the model so that their dtypes match (e.g. "
                                 f"member.to({ref.dtype}) or model.to({tensor.dtype}))")


def check_same_entries(model_a: StateLike, model_b: StateLike, name_a: str = "model_a",
                       name_b: str = "model_b") -> None:
    """Raise ValueError naming the entry (and both shapes) where two models' state dicts differ."""
    _check_same_entries(_state_dict(model_a), _state_dict(model_b), name_a, name_b)


def _check_same_entries(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], ref_name: str, other_name: str) -> None:
    missing = [n for n in reference if n not in other]
    extra = [n for n in other if n not in reference]
    if missing:
        raise ValueError(f"{other_name} has no entry '{missing[0]}' that {ref_name} has"
                         + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
                         + ": are they the same architecture?")
    if extra:
        raise ValueError(f"{other_name} has an entry '{extra[0]}' that {ref_name} does not have"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + ": are they the same architecture?")
    for name, ref in reference.items():
        if other[name].shape != ref.shape:
            raise ValueError(f"parameter '{name}' has shape {_shape(ref.shape)} in {ref_name} "
                             f"but {_shape(other[name].shape)} in {other_name}")
