"""A curve between two models as a trainable subspace (Garipov et al. 2018): control points and a rule t -> row.

    θ(t) = Σ_k c_k(t) θ_k,   θ_0 = model A, θ_{K−1} = model B, θ_1 … θ_{K−2} the bends (K = bends + 2)

The control points (a `TrainableSubspace`) are copies of the user's own architecture (`curve.control_points[k]`
is a plain model at control point k); the free ones are the curve's trainable parameters (BatchNorm affine
parameters included), the fixed ends have `requires_grad=False`. `curve(x, t)` runs the model at θ(t) for one or
several t in one pass of a subspace view, with gradients flowing to the free control points. Subclasses only say
how t becomes a coefficient row (`coefficients`): Bernstein polynomials for a Bezier curve, hat functions for a
polygonal chain. `output` picks the logits of a model that returns a tuple, dict or dataclass, as in `evaluate`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..engine.outputs import OutputSelector
from ..subspace import check_same_entries
from .trainable import TrainableSubspace

INITS = ("linear",)


class Curve(TrainableSubspace):
    """Base class: K control points between `model_a` and `model_b`; see the module docstring."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, bends: int = 1, fix_start: bool = True,
                 fix_end: bool = True, init: str = "linear", output: OutputSelector = None):
        if not isinstance(bends, int) or bends < 1:
            raise ValueError(f"bends must be an integer ≥ 1 (the control points between the two ends), got {bends!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        check_same_entries(model_a, model_b, "model_a", "model_b")
        super().__init__(model_a)
        self.bends = bends
        self.output = output
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        for k in range(bends + 2):
            alpha = k / (bends + 1)  # init="linear": evenly spaced on the straight line; exactly A and B at the ends
            state = {name: (1 - alpha) * a + alpha * state_b[name] if torch.is_floating_point(a) else a.clone()
                     for name, a in state_a.items()}
            fixed = (k == 0 and fix_start) or (k == bends + 1 and fix_end)
            self.add_point(state, trainable=not fixed)

    def coefficients(self, t: Tensor | float) -> Tensor:
        """Rows c(t) [len(t), K] with θ(t) = Σ_k c_k(t) θ_k; defined by each kind of curve."""
        raise NotImplementedError

    def forward(self, x: Tensor | tuple[Tensor, ...], t: Tensor | float) -> Tensor:
        """The model's outputs at θ(t): [N, ...] for one t (a float or 0-d tensor), [len(t), N, ...] for a 1-d
        tensor of t values, all in one pass. In train mode Dropout is on and BatchNorm normalises each t's
        batch with its own statistics; in eval mode BatchNorm mixes the control points' stored statistics."""
        t_values = torch.as_tensor(t, dtype=torch.float64)
        out = self.outputs(x, self.coefficients(t_values.reshape(-1)))
        return out[0] if t_values.dim() == 0 else out

    def model_at(self, t: float, *, bn_data: Any = None) -> nn.Module:
        """A plain copy of the architecture with the weights θ(t). With `bn_data` (inputs, or (inputs, targets),
        tensors or batches), BatchNorm running statistics are recomputed at θ(t) as the 2018 reference's
        update_bn does; otherwise they are the control points' statistics mixed by c(t)."""
        row = self.coefficients(torch.tensor([float(t)], dtype=torch.float64))
        return self.model_at_row(row[0], bn_data=bn_data)

    def length(self, points: int = 1001) -> float:
        """The curve's length in weight space (parameters only), Σ_i ‖θ(t_{i+1}) − θ(t_i)‖ over `points` values of t."""
        rows = self.coefficients(torch.linspace(0, 1, points, dtype=torch.float64))
        with torch.no_grad():
            gram = self.gram().double().cpu()
        return float(segment_lengths(rows, gram).sum())


def segment_lengths(rows: Tensor, gram: Tensor) -> Tensor:
    """‖θ(t_{i+1}) − θ(t_i)‖ for consecutive coefficient rows, from the Gram matrix of the basis: [len(rows) − 1]."""
    steps = (rows[1:] - rows[:-1]).to(gram.dtype)
    return torch.einsum("ik,kl,il->i", steps, gram, steps).clamp_min(0).sqrt()


def check_t(t: Tensor) -> Tensor:
    """t as a 1-d float64 tensor in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("t is empty: give at least one value in [0, 1]")
    low, high = (float(v) for v in torch.aminmax(t))  # one reduction; a NaN comes out as both, failing the test
    if not 0 <= low <= high <= 1:
        raise ValueError(f"t must lie in [0, 1] (0 is model A, 1 is model B), got values from {low} to {high}")
    return t
