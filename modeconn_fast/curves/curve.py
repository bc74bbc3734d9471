"""A curve between two models as a trainable subspace (Garipov et al. 2018): control points and a rule t -> row.

    θ(t) = Σ_k c_k(t) θ_k,   θ_0 = model A, θ_{K−1} = model B, θ_1 … θ_{K−2} the bends (K = bends + 2)

The control points are copies of the user's own architecture (`curve.control_points[k]` is a plain model at
control point k); the free ones are the curve's trainable parameters (BatchNorm affine parameters included),
the fixed ends have `requires_grad=False`. `curve(x, t)` runs the model at θ(t) for one or several t in one pass
of a subspace view, with gradients flowing to the free control points. Subclasses only say how t becomes a
coefficient row (`coefficients`): Bernstein polynomials for a Bezier curve, hat functions for a polygonal chain.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import SubspaceView
from ..engine.batches import Batches, move
from ..subspace import Basis, check_same_architecture

INITS = ("linear",)


class Curve(nn.Module):
    """Base class: K control points between `model_a` and `model_b`; see the module docstring."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, bends: int = 1, fix_start: bool = True,
                 fix_end: bool = True, init: str = "linear"):
        super().__init__()
        if not isinstance(bends, int) or bends < 1:
            raise ValueError(f"bends must be an integer ≥ 1 (the control points between the two ends), got {bends!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        check_same_architecture(model_a, model_b, "model_a", "model_b")
        self._architecture = (copy.deepcopy(model_a).eval().requires_grad_(False),)
        self.bends = bends
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        points = []
        for k in range(bends + 2):
            alpha = k / (bends + 1)  # init="linear": evenly spaced on the straight line; exactly A and B at the ends
            state = {name: (1 - alpha) * a + alpha * state_b[name] if torch.is_floating_point(a) else a.clone()
                     for name, a in state_a.items()}
            point = copy.deepcopy(self.architecture)
            point.load_state_dict(state)
            fixed = (k == 0 and fix_start) or (k == bends + 1 and fix_end)
            points.append(point.requires_grad_(not fixed))
        self.control_points = nn.ModuleList(points)
        self._view: SubspaceView | None = None

    @property
    def architecture(self) -> nn.Module:
        """A frozen copy of model A: the architecture every point of the curve runs in."""
        return self._architecture[0]

    @property
    def size(self) -> int:
        """K, the number of control points (bends + 2)."""
        return len(self.control_points)

    def coefficients(self, t: Tensor | float) -> Tensor:
        """Rows c(t) [len(t), K] with θ(t) = Σ_k c_k(t) θ_k; defined by each kind of curve."""
        raise NotImplementedError

    # --- the weights ----------------------------------------------------------------------------------------
    def stacked(self) -> dict[str, Tensor]:
        """Every floating-point entry of the model stacked over the control points, [K, *shape]; the free
        points' parameters record gradients."""
        states = [point.state_dict(keep_vars=True) for point in self.control_points]
        return {name: torch.stack([state[name] for state in states])
                for name, first in states[0].items() if torch.is_floating_point(first)}

    def basis(self) -> Basis:
        """A detached snapshot of the control points as a `Basis` (for `evaluate` and scans)."""
        with torch.no_grad():
            stacked = self.stacked()
        constants = {name: t.clone() for name, t in self.control_points[0].state_dict().items()
                     if not torch.is_floating_point(t)}
        return Basis(stacked, constants)

    def parameter_names(self) -> list[str]:
        """The entries that are parameters of the model (not buffers): what weight decay and lengths count."""
        return [name for name, _ in self.architecture.named_parameters()]

    def gram(self, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """G[k, l] = ⟨θ_k, θ_l⟩ over the model's parameters: ‖Σ_k c_k θ_k‖² = cᵀ G c, differentiable."""
        stacked = self.stacked() if stacked is None else stacked
        total = None
        for name in self.parameter_names():
            flat = stacked[name].reshape(self.size, -1)
            product = flat @ flat.T
            total = product if total is None else total + product
        return total

    # --- running the model ----------------------------------------------------------------------------------
    def forward(self, x: Tensor | tuple[Tensor, ...], t: Tensor | float) -> Tensor:
        """The model's outputs at θ(t): [N, ...] for one t (a float or 0-d tensor), [len(t), N, ...] for a 1-d
        tensor of t values, all in one pass. In train mode Dropout is on and BatchNorm normalises each t's
        batch with its own statistics; in eval mode BatchNorm mixes the control points' stored statistics."""
        t_values = torch.as_tensor(t, dtype=torch.float64)
        out = self.outputs(x, self.coefficients(t_values.reshape(-1)))
        return out[0] if t_values.dim() == 0 else out

    def outputs(self, x: Tensor | tuple[Tensor, ...], rows: Tensor, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """The outputs [P, N, ...] at the points with coefficient rows [P, K] (`stacked`: the control points as
        `stacked()` gives them, when the caller has them already)."""
        stacked = self.stacked() if stacked is None else stacked
        rows = rows.to(next(iter(stacked.values())).dtype)
        inputs = (x,) if isinstance(x, Tensor) else tuple(x)
        view = self._subspace_view(rows, inputs)
        view.rebind(stacked)
        if view.training != self.training:
            view.train(self.training)
        return view(rows, inputs)

    def _subspace_view(self, rows: Tensor, inputs: tuple[Tensor, ...]) -> SubspaceView:
        if self._view is None:
            view = SubspaceView(self.architecture, self.basis())
            view.prepare(rows.detach(), inputs)
            self._view = view
        return self._view

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(): the view is rebuilt for the new tensors
        self._view = None
        self._architecture = (self._architecture[0]._apply(fn),)
        return super()._apply(fn, recurse)

    def model_at(self, t: float, *, bn_data: Any = None) -> nn.Module:
        """A plain copy of the architecture with the weights θ(t). With `bn_data` (inputs, or (inputs, targets),
        tensors or batches), BatchNorm running statistics are recomputed at θ(t) as the 2018 reference's
        update_bn does; otherwise they are the control points' statistics mixed by c(t)."""
        row = self.coefficients(torch.tensor([float(t)], dtype=torch.float64))
        basis = self.basis()
        row = row.to(next(iter(basis.stacked.values())).dtype)
        state = basis.point(row[0])
        if bn_data is not None:
            batches = Batches(bn_data, "bn_data", targets_optional=True)
            device = row.device if not basis.stacked else next(iter(basis.stacked.values())).device
            view = SubspaceView(self.architecture, basis)
            view.prepare(row.to(device), move(batches.first[0], device))
            view.recompute_batchnorm(row.to(device), (move(inputs, device) for inputs, _ in batches))
            state |= {name: value[0] for name, value in view.recomputed_batchnorm_state().items()}
        model = copy.deepcopy(self.architecture)
        model.load_state_dict(state)
        return model.requires_grad_(True)

    def length(self, points: int = 1001) -> float:
        """The curve's length in weight space (parameters only), Σ_i ‖θ(t_{i+1}) − θ(t_i)‖ over `points` values of t."""
        rows = self.coefficients(torch.linspace(0, 1, points, dtype=torch.float64))
        with torch.no_grad():
            gram = self.gram().double()
        return float(segment_lengths(rows, gram).sum())

    def extra_repr(self) -> str:
        free = [k for k, point in enumerate(self.control_points) if any(p.requires_grad for p in point.parameters())]
        return f"control_points={self.size}, free={free}"


def segment_lengths(rows: Tensor, gram: Tensor) -> Tensor:
    """‖θ(t_{i+1}) − θ(t_i)‖ for consecutive coefficient rows, from the Gram matrix of the basis: [len(rows) − 1]."""
    steps = (rows[1:] - rows[:-1]).to(gram.dtype)
    return torch.einsum("ik,kl,il->i", steps, gram, steps).clamp_min(0).sqrt()


def check_t(t: Tensor) -> Tensor:
    """t as a 1-d float64 tensor in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("t is empty: give at least one value in [0, 1]")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"t must lie in [0, 1] (0 is model A, 1 is model B), got values from {float(t.min())} to "
                         f"{float(t.max())}")
    return t
