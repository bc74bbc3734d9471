"""Planes and lines of weight space to scan: an origin and one or two directions, as a `Basis`.

A subspace with basis (o, e_1, …, e_d) puts the point of coordinates z at θ(z) = o + Σ_j z_j e_j: its
coefficient row is (1, z_1, …, z_d). Inner products and norms are taken over the model's parameters only
(buffers such as BatchNorm running statistics are transformed with the same coefficients, so at a model's
coordinates they are that model's, but they do not count in distances or angles).

- `Plane.through(m0, m1, m2)` (Garipov et al. 2018): u = (w_2 − w_0)/‖w_2 − w_0‖,
  v = (w_1 − w_0) − ((w_1 − w_0)·u) u, normalised; θ(α, β) = w_0 + α u + β v (orthonormal, in weight-space units).
- `Plane.affine(m0, m1, m2)`: θ(x, y) = m_0 + x (m_1 − m_0) + y (m_2 − m_0).
- `Plane.random(model)`, `Line.random(model)` (Li et al. 2018): θ(x, y) = θ + x d_1 + y d_2 with Gaussian,
  filter-normalised directions (see `directions.py`).
- `Plane.pca(checkpoints)` (Li et al. 2018, §7): θ(x, y) = θ_c + x e_1 + y e_2 with e_1, e_2 the two top principal
  directions of a training trajectory's checkpoints (see `Plane.pca`).
- `Line.through(m0, m1)`: θ(t) = m_0 + t (m_1 − m_0), the straight line of `interpolate`.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..subspace import Basis, StateLike
from .directions import Ignore, Normalization, check_direction_options, random_direction
from ..checkpoints import read_state

Checkpoint = Union[StateLike, str, os.PathLike]


class Subspace:
    """An origin and `dims` directions. `marks` holds the coordinates of the models that define it (drawn on plots)."""

    kind = "subspace"
    coordinates: Tensor | None = None  # [n, dims] float64: a trajectory's checkpoints (Plane.pca), else None

    def __init__(self, basis: Basis, parameters: Sequence[str], variant: str, marks: Mapping[str, Sequence[float]],
                 settings: Mapping[str, object] | None = None):
        self.basis = basis
        self.parameters = tuple(parameters)
        self.variant = variant
        self.marks = {name: tuple(float(c) for c in coords) for name, coords in marks.items()}
        self.settings = dict(settings or {})

    @property
    def dims(self) -> int:
        return self.basis.size - 1

    def rows(self, coords: Tensor) -> Tensor:
        """Coefficient rows (1, z_1, …, z_d) for coordinates [P, d] (float64)."""
        coords = torch.as_tensor(coords, dtype=torch.float64)
        if coords.dim() != 2 or coords.shape[1] != self.dims:
            raise ValueError(f"coordinates on a {self.kind} must have shape [points, {self.dims}], got {tuple(coords.shape)}")
        return torch.cat([torch.ones(coords.shape[0], 1, dtype=torch.float64), coords], dim=1)

    def describe(self) -> dict:
        """What defines the subspace, as plain data (stored with every scan)."""
        return {"kind": self.kind, "variant": self.variant, "dims": self.dims, **self.settings,
                "marks": {name: list(coords) for name, coords in self.marks.items()}}

    def extent(self, margin: float = 0.2) -> list[tuple[float, float]]:
        """A span per axis: the box around the marked models (and `coordinates`), widened by `margin` of its size on each side
        ((−1, 1) along a random direction)."""
        spans = []
        points = list(self.marks.values()) + (self.coordinates.tolist() if self.coordinates is not None else [])
        for axis in range(self.dims):
            values = [coords[axis] for coords in points]
            low, high = min(values), max(values)
            if high == low:
                spans.append((low - 1.0, high + 1.0))
            else:
                pad = margin * (high - low)
                spans.append((low - pad, high + pad))
        return spans

    def project(self, basis: Basis | Sequence[StateLike], rows: Tensor) -> Tensor:
        """Coordinates [n, d] of the points Σ_k rows[n, k] basis[k] (e.g. a curve) projected onto this subspace.

        Least squares over the parameters: z = G⁻¹ E (θ − o) with G = [e_i·e_j] and θ's inner products with
        the directions taken from the bases' Gram blocks, so no point's weights are formed. A point inside the
        subspace gets its exact coordinates."""
        other = basis if isinstance(basis, Basis) else Basis.from_members(list(basis))
        rows = torch.as_tensor(rows, dtype=torch.float64)
        if rows.dim() != 2 or rows.shape[1] != other.size:
            raise ValueError(f"rows must have shape [points, {other.size}] (one column per basis member), "
                             f"got {tuple(rows.shape)}")
        own_own = _inner(self.basis, self.basis, self.parameters)
        own_other = _inner(self.basis, other, self.parameters)
        directions = own_own[1:, 1:]
        right = rows @ own_other[1:].T - own_own[1:, 0]
        return torch.linalg.solve(directions, right.T).T

    def __repr__(self) -> str:
        settings = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}.{self.variant}(marks={self.marks}{settings})"


class Plane(Subspace):
    """A 2-d subspace: points (x, y); scans store their metrics as [len(ys), len(xs)]."""

    kind = "plane"
    explained_variance: tuple[float, float] | None = None  # Plane.pca: the share of the variance along e_1, e_2

    @classmethod
    def through(cls, m0: StateLike, m1: StateLike, m2: StateLike, *, names: Sequence[str] = ("m0", "m1", "m2"),
                like: nn.Module | None = None) -> "Plane":
        """The plane through three models in Garipov's orthonormal frame: origin w_0, u along w_2 − w_0, v the
        rest of w_1 − w_0. Usually m0, m2 are the ends of a curve and m1 its middle control point.
        Coordinates are distances in weight space: m0 is at (0, 0), m2 at (‖w_2 − w_0‖, 0), m1 at
        ((w_1 − w_0)·u, (w_1 − w_0)·v)."""
        model = _architecture((m0, m1, m2), like)
        members = Basis.from_members([m0, m1, m2], like=model)
        parameters = _parameter_names(model)
        affine = members.transform(torch.tensor([[1.0, 0, 0], [-1, 1, 0], [-1, 0, 1]]))
        gram = _inner(affine, affine, parameters)[1:, 1:]  # [[d1·d1, d1·d2], [d2·d1, d2·d2]], d_i = w_i − w_0
        if gram[1, 1] <= 0:
            raise ValueError(f"Plane.through: {names[2]} and {names[0]} have the same parameters: no direction u")
        length = math.sqrt(float(gram[1, 1]))
        along = float(gram[0, 1]) / length  # (w_1 − w_0)·u
        across = math.sqrt(max(float(gram[0, 0]) - along**2, 0.0))
        dtype = next(iter(members.stacked.values())).dtype
        if across <= math.sqrt(torch.finfo(dtype).eps) * math.sqrt(float(gram[0, 0])):  # collinear up to rounding
            raise ValueError(f"Plane.through: {names[0]}, {names[1]} and {names[2]} lie on one line: they span no plane "
                             "(use Line.through, or Plane.random around one of them)")
        share = along / length  # v' = d1 − share · d2
        matrix = torch.tensor([[1.0, 0, 0], [-1 / length, 0, 1 / length],
                               [(share - 1) / across, 1 / across, -share / across]], dtype=torch.float64)
        marks = {names[0]: (0.0, 0.0), names[1]: (along, across), names[2]: (length, 0.0)}
        return cls(members.transform(matrix), parameters, "through", marks)

    @classmethod
    def affine(cls, m0: StateLike, m1: StateLike, m2: StateLike, *, names: Sequence[str] = ("m0", "m1", "m2"),
               like: nn.Module | None = None) -> "Plane":
        """θ(x, y) = m0 + x (m1 − m0) + y (m2 − m0): m0 at (0, 0), m1 at (1, 0), m2 at (0, 1)."""
        model = _architecture((m0, m1, m2), like)
        members = Basis.from_members([m0, m1, m2], like=model)
        basis = members.transform(torch.tensor([[1.0, 0, 0], [-1, 1, 0], [-1, 0, 1]]))
        marks = {names[0]: (0.0, 0.0), names[1]: (1.0, 0.0), names[2]: (0.0, 1.0)}
        return cls(basis, _parameter_names(model), "affine", marks)

    @classmethod
    def random(cls, model: nn.Module, *, normalization: Normalization = "filter", ignore: Ignore = "biasbn",
               seed: int = 0, name: str = "model") -> "Plane":
        """θ(x, y) = θ + x d_1 + y d_2 around `model`, with Gaussian directions d_1, d_2 drawn from `seed` and
        normalised per filter ("filter"), per tensor ("layer") or not at all (None); see `directions.py`."""
        return cls(*_random_basis(model, 2, normalization, ignore, seed), "random", {name: (0.0, 0.0)},
                   {"normalization": normalization, "ignore": ignore, "seed": seed})


    @classmethod
    def pca(cls, checkpoints: Sequence[Checkpoint], *, center: int = -1, names: Sequence[str] | None = None,
            like: nn.Module | None = None) -> "Plane":
        """The plane of a training trajectory (Li et al. 2018, §7): origin θ_c = checkpoints[center] (default the
        last), directions the two top principal directions of the n checkpoints' parameters:

            Δ_i = θ_i − θ_c,  X = [Δ_i − mean(Δ)] (n × D),  X Xᵀ = V Λ Vᵀ (λ_1 ≥ λ_2 ≥ …),
            e_j = Xᵀ v_j / √λ_j,  θ(x, y) = θ_c + x e_1 + y e_2.

        As in a PCA the rows are centred, so e_1, e_2 are those of the checkpoints themselves whatever the center
        (Li et al.'s code leaves θ_c out of the rows). `coordinates` [n, 2] holds every checkpoint's (x, y) =
        (Δ_i·e_1, Δ_i·e_2), exact when the trajectory lies in a plane; `explained_variance` is (λ_1, λ_2) / Σ λ.
        Signs: x and y grow from the first checkpoint to the last. Buffers (BatchNorm statistics) follow the same
        linear combinations. checkpoints: at least three models, state dicts or paths of .pt state dicts (read
        with torch.load(weights_only=True)), all held in memory while the plane is built (the plane keeps three);
        like: the architecture, needed when no checkpoint is an nn.Module. names: one per checkpoint (default:
        the file names, or "checkpoint i"); the first, the center and the last are the plane's marks."""
        if isinstance(checkpoints, (str, os.PathLike, nn.Module, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError("Plane.pca: checkpoints must be a list of models, state dicts or .pt paths (e.g. "
                            f"TrajectoryRecorder.files), got {type(checkpoints).__name__}")
        count = len(checkpoints)
        if count < 3:
            raise ValueError(f"Plane.pca: checkpoints needs at least three checkpoints to span a plane, got {count} "
                             "(record more steps of the trajectory, e.g. TrajectoryRecorder(model, every=...))")
        if not isinstance(center, int) or not -count <= center < count:
            raise ValueError(f"Plane.pca: center must index one of the {count} checkpoints (-{count} … {count - 1}), "
                             f"got {center!r}")
        names = list(names) if names is not None else [
            os.path.splitext(os.path.basename(c))[0] if isinstance(c, (str, os.PathLike)) else f"checkpoint {i}"
            for i, c in enumerate(checkpoints)]
        if len(names) != count:
            raise ValueError(f"Plane.pca: names needs one name per checkpoint ({count}), got {len(names)}")
        c = center % count
        members = [read_state(m) if isinstance(m, (str, os.PathLike)) else m for m in checkpoints]
        model = _architecture(members, like)
        parameters = _parameter_names(model)
        # rows Δ_i = θ_i − θ_c for i ≠ c, and θ_c itself in row c: differences formed before any product
        to_differences = torch.eye(count, dtype=torch.float64)
        to_differences[:, c] -= 1
        to_differences[c, c] = 1
        differences = Basis.from_members(members, like=model).transform(to_differences)
        gram = _inner(differences, differences, parameters)
        gram[c, :] = gram[:, c] = 0  # Δ_c = 0
        centring = torch.eye(count, dtype=torch.float64) - 1 / count
        eigenvalues, vectors = torch.linalg.eigh(centring @ gram @ centring)
        eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
        dtype = next(iter(differences.stacked.values())).dtype
        if eigenvalues[0] <= 0:
            raise ValueError("Plane.pca: all checkpoints have the same parameters: they span no plane")
        if eigenvalues[1] <= torch.finfo(dtype).eps * eigenvalues[0]:
            raise ValueError("Plane.pca: the checkpoints lie on one line: they span no plane (use Line.through)")
        combination = (centring @ vectors[:, :2] / eigenvalues[:2].sqrt()).T  # e_j = Σ_i combination[j, i] Δ_i
        combination[:, c] = 0
        coordinates = gram @ combination.T  # Δ_i · e_j
        signs = torch.where(coordinates[-1] >= coordinates[0], 1.0, -1.0).to(torch.float64)
        combination, coordinates = combination * signs[:, None], coordinates * signs
        origin = torch.zeros(1, count, dtype=torch.float64)
        origin[0, c] = 1
        basis = differences.transform(torch.cat([origin, combination]))
        explained = tuple(float(v) for v in eigenvalues[:2] / eigenvalues.clamp_min(0).sum())
        marks = {names[i]: tuple(coordinates[i].tolist()) for i in (0, c, count - 1)}
        plane = cls(basis, parameters, "pca", marks,
                    {"checkpoints": count, "center": c, "explained_variance": list(explained)})
        plane.coordinates, plane.explained_variance = coordinates, explained
        return plane


class Line(Subspace):
    """A 1-d subspace: points x; scans store their metrics as [len(xs)]."""

    kind = "line"

    @classmethod
    def through(cls, m0: StateLike, m1: StateLike, *, names: Sequence[str] = ("m0", "m1"),
                like: nn.Module | None = None) -> "Line":
        """θ(t) = m0 + t (m1 − m0): m0 at t = 0, m1 at t = 1 (the straight line of `interpolate`)."""
        model = _architecture((m0, m1), like)
        basis = Basis.from_members([m0, m1], like=model).transform(torch.tensor([[1.0, 0], [-1, 1]]))
        return cls(basis, _parameter_names(model), "through", {names[0]: (0.0,), names[1]: (1.0,)})

    @classmethod
    def random(cls, model: nn.Module, *, normalization: Normalization = "filter", ignore: Ignore = "biasbn",
               seed: int = 0, name: str = "model") -> "Line":
        """θ(x) = θ + x d with one Gaussian direction, normalised as in `Plane.random`."""
        return cls(*_random_basis(model, 1, normalization, ignore, seed), "random", {name: (0.0,)},
                   {"normalization": normalization, "ignore": ignore, "seed": seed})


def _random_basis(model: nn.Module, count: int, normalization: Normalization, ignore: Ignore,
                  seed: int) -> tuple[Basis, tuple[str, ...]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"a random plane or line is drawn around an nn.Module, got {type(model).__name__}")
    check_direction_options(normalization, ignore)
    state = model.state_dict()
    parameters = _parameter_names(model)
    generator = torch.Generator().manual_seed(seed)
    directions = [random_direction(state, set(parameters), generator, normalization=normalization, ignore=ignore)
                  for _ in range(count)]
    constants = {n: t for n, t in state.items() if not torch.is_floating_point(t)}
    return Basis.from_members([state, *[d | constants for d in directions]], like=model), parameters


def _architecture(members: Sequence[StateLike], like: nn.Module | None) -> nn.Module:
    """The model that tells parameters from buffers: `like`, or the first member that is an nn.Module."""
    if like is not None:
        return like
    for member in members:
        if isinstance(member, nn.Module):
            return member
    raise ValueError("all members are state dicts: pass like=model (the architecture) so that parameters can be "
                     "told from buffers")


def _parameter_names(model: nn.Module) -> tuple[str, ...]:
    names = {name for name, _ in model.named_parameters()}
    return tuple(name for name in model.state_dict() if name in names)


def _inner(a: Basis, b: Basis, names: Sequence[str]) -> Tensor:
    """[a.size, b.size] float64 inner products of the members over the entries `names`."""
    total = torch.zeros(a.size, b.size, dtype=torch.float64)
    for name in names:
        if name not in b.stacked or b.stacked[name].shape[1:] != a.stacked[name].shape[1:]:
            shape = tuple(b.stacked[name].shape[1:]) if name in b.stacked else "no such entry"
            raise ValueError(f"parameter '{name}' has shape {tuple(a.stacked[name].shape[1:])} in the subspace but "
                             f"{shape} in the basis to project: are they the same architecture?")
        left = a.stacked[name].detach().cpu().double().reshape(a.size, -1)
        right = b.stacked[name].detach().cpu().double().reshape(b.size, -1)
        total += left @ right.T
    return total
