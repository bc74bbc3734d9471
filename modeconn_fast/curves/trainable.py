"""A trainable weight subspace: control points that are copies of the user's model, run through one subspace view.

    θ(c) = Σ_k c_k θ_k    for a coefficient row c over the control points θ_0 … θ_{K−1}

`points.control_points[k]` is a plain model of the user's architecture; the free ones are the trainable
parameters (BatchNorm affine parameters included), the fixed ones have `requires_grad=False`. `outputs(x, rows)`
runs the model at several rows in one pass of a `SubspaceView` whose basis is the control points stacked
(`stacked()`, rebound before every pass), so gradients reach the free points. Curves (a rule t -> row),
simplexes (barycentric rows) and the nudged elastic band (one-hot rows, one per pivot) are built on it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..engine import SubspaceView
from ..engine.batches import Batches, move
from ..engine.outputs import OutputSelector, pick_output
from ..engine.view import WHOLE_MODEL
from ..subspace import Basis
from .one_point import OnePointModel, supports_one_point
from .sample_major import SampleMajorSequential, supports_sample_major


class TrainableSubspace(nn.Module):
    """Control points of one architecture (a frozen copy of `model`); see the module docstring."""

    _view_checks: tuple[bool, ...] | None = None  # a copy's: what the original's view found on its probe batch
    output: OutputSelector = None  # which part of a tuple, dict or dataclass output holds the logits (`evaluate`)

    def __init__(self, model: nn.Module):
        super().__init__()
        self._architecture = (copy.deepcopy(model).eval().requires_grad_(False),)
        self.control_points = nn.ModuleList()
        self._view: SubspaceView | None = None
        self._entries: dict[str, list[Tensor]] | None = None  # per floating entry, its tensor in every point
        self._parameters_per_point: list[list[Tensor]] | None = None
        self._flat_views: list[Tensor] | None = None  # the parameters of every point as 1-d views
        self._one_point: OnePointModel | None | bool = None  # False where the architecture needs the view
        self._sample_major: SampleMajorSequential | None | bool = None  # likewise

    @property
    def architecture(self) -> nn.Module:
        """A frozen copy of the first model: the architecture every point runs in."""
        return self._architecture[0]

    @property
    def size(self) -> int:
        """K, the number of control points."""
        return len(self.control_points)

    def add_point(self, state: Mapping[str, Tensor], *, trainable: bool) -> nn.Module:
        """Append a control point holding `state` (a state dict of the architecture); returns it."""
        point = copy.deepcopy(self.architecture)
        point.load_state_dict(state)
        self.control_points.append(point.requires_grad_(trainable))
        self._view = self._entries = self._parameters_per_point = self._flat_views = None
        self._one_point = self._sample_major = None
        return point

    # --- the weights ----------------------------------------------------------------------------------------
    def stacked(self) -> dict[str, Tensor]:
        """Every floating-point entry of the model stacked over the control points, [K, *shape]; the free
        points' parameters record gradients. (The points' tensors are looked up once: update them in place, as
        optimisers and load_state_dict do.)"""
        return {name: torch.stack(tensors) for name, tensors in self._entry_lists().items()}

    def _entry_lists(self) -> dict[str, list[Tensor]]:
        """Per floating-point entry, its tensor in every control point (looked up once)."""
        if self._entries is None:
            states = [point.state_dict(keep_vars=True) for point in self.control_points]
            self._entries = {name: [state[name] for state in states]
                             for name, first in states[0].items() if torch.is_floating_point(first)}
        return self._entries

    def basis(self) -> Basis:
        """A detached snapshot of the control points as a `Basis` (for `evaluate` and scans)."""
        with torch.no_grad():
            stacked = self.stacked()
        constants = {name: t.clone() for name, t in self.control_points[0].state_dict().items()
                     if not torch.is_floating_point(t)}
        return Basis(stacked, constants)

    def _parameter_lists(self) -> list[list[Tensor]]:
        """Per control point, its parameters in `parameter_names` order (looked up once)."""
        if self._parameters_per_point is None:
            entries = self._entry_lists()
            names = self.parameter_names()
            self._parameters_per_point = [[entries[name][k] for name in names] for k in range(self.size)]
        return self._parameters_per_point

    def _current_flat_parameters(self) -> Tensor:
        """`flat_parameters()` without gradients, concatenated from flat views of the parameters kept between calls
        (made again when a parameter's memory moved, e.g. after `p.data = ...`)."""
        params = [p for point in self._parameter_lists() for p in point]
        views = self._flat_views
        if views is None or [v.data_ptr() for v in views] != [p.data_ptr() for p in params]:
            views = self._flat_views = [p.detach().reshape(-1) for p in params]
        return torch.cat(views).view(self.size, -1)

    def parameter_names(self) -> list[str]:
        """The entries that are parameters of the model (not buffers): what weight decay and lengths count."""
        return [name for name, _ in self.architecture.named_parameters()]

    def flat_parameters(self, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """The control points' parameters as rows [K, D] (in `parameter_names` order)."""
        stacked = self.stacked() if stacked is None else stacked
        return torch.cat([stacked[name].reshape(self.size, -1) for name in self.parameter_names()], dim=1)

    def gram(self, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """G[k, l] = ⟨θ_k, θ_l⟩ over the model's parameters: ‖Σ_k c_k θ_k‖² = cᵀ G c, differentiable."""
        flat = self.flat_parameters(stacked)  # one product (and two in backward) instead of three per entry
        return flat @ flat.T

    def add_weight_decay(self, rows: Tensor, weight_decay: float) -> float:
        """The weight decay term ½·wd·mean_p ‖θ(c_p)‖² over the coefficient rows [P, K], its gradient added to
        the free parameters' `.grad` directly (no autograd graph): ∂/∂θ_m = wd·Σ_k A[m, k] θ_k, A = mean_p c_p c_pᵀ.
        Returns the term's value, ½·wd·Σ_kl A[k, l] G[k, l] with G the Gram matrix (`gram`)."""
        rows = rows.detach().to(device="cpu", dtype=torch.float64)
        second_moment = rows.T @ rows / rows.shape[0]  # A [K, K]: the scalars of the gradient, on the host
        factors = (weight_decay * second_moment).tolist()
        per_point = self._parameter_lists()
        with torch.no_grad():
            for m, params in enumerate(per_point):
                free = [i for i, p in enumerate(params) if p.requires_grad]
                if not free:
                    continue
                for i in free:
                    if params[i].grad is None:
                        params[i].grad = torch.zeros_like(params[i])
                grads = [params[i].grad for i in free]
                for k, others in enumerate(per_point):
                    if factors[m][k] != 0:
                        torch._foreach_add_(grads, [others[i] for i in free], alpha=factors[m][k])
            flat = self._current_flat_parameters()
            gram = (flat @ flat.T).to(device="cpu", dtype=torch.float64)
        return 0.5 * weight_decay * float((second_moment * gram).sum())

    # --- running the model ----------------------------------------------------------------------------------
    def outputs(self, x: Tensor | tuple[Tensor, ...], rows: Tensor, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """The outputs [P, N, ...] at the points with coefficient rows [P, K] (`stacked`: the control points as
        `stacked()` gives them, when the caller has them already). In train mode Dropout is on and BatchNorm
        normalises each point's batch with its own statistics; in eval mode BatchNorm mixes the stored ones.
        In train mode one row runs the plain model at that point (`one_point.py`), several rows of an
        nn.Sequential run sample-major (`sample_major.py`), where the architecture allows."""
        inputs = (x,) if isinstance(x, Tensor) else tuple(x)
        if stacked is None and self.training:
            out = self._plain_outputs(inputs, rows)
            if out is not None:
                return out
        stacked = self.stacked() if stacked is None else stacked
        first = next(iter(stacked.values()))
        rows = rows.to(device=first.device, dtype=first.dtype)
        view = self._subspace_view(rows, inputs)
        view.rebind(stacked)
        if view.training != self.training:
            view.train(self.training)
        return view(rows, inputs)

    def _plain_outputs(self, inputs: tuple[Tensor, ...], rows: Tensor) -> Tensor | None:
        """`outputs` in train mode without the view, or None where the view runs the architecture."""
        per_point = self._parameter_lists()
        first = per_point[0][0]
        rows = rows.to(device=first.device, dtype=first.dtype)
        samples = inputs[0].shape[0]
        if rows.shape[0] == 1:
            if self._one_point is None:
                supported = supports_one_point(self.architecture, list(self._entry_lists()))
                self._one_point = supported and OnePointModel(self.architecture, self.parameter_names())
            if not self._one_point:
                return None
            out = pick_output(self._one_point(per_point, rows, inputs), self.output)
            return out.unsqueeze(0) if out.dim() > 0 and out.shape[0] == samples else None  # else the view says why
        if self._sample_major is None:
            supported = supports_sample_major(self.architecture, list(self._entry_lists())) and self.output is None
            self._sample_major = supported and SampleMajorSequential(self.architecture, self.parameter_names())
        if not self._sample_major or len(inputs) != 1:
            return None
        try:
            return self._sample_major(per_point, rows, inputs[0])
        except NotImplementedError:  # a layer the sample-major layout cannot take (e.g. a Linear on 3-d inputs)
            self._sample_major = False
            return None

    def _subspace_view(self, rows: Tensor, inputs: tuple[Tensor, ...]) -> SubspaceView:
        if self._view is None:
            view = SubspaceView(self.architecture, self.basis(), output=self.output)
            if self._view_checks is None:
                view.prepare(rows.detach(), inputs)
            else:  # a copy of a subspace whose view passed the checks: the same architecture passes them
                view.reads_shared_rows_only = self._view_checks
            object.__setattr__(self, "_view", view)  # a cache, not a submodule: no entries in state_dict()
        return self._view

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the cached view and tensor look-ups (rebuilt at first use): after a
        training step the view holds tensors of that step's graph, which cannot be deep-copied. They keep the
        outcome of the view's checks on a probe batch (`SubspaceView.prepare`) when the model passed them."""
        view = self._view
        checks = self._view_checks if view is None else (
            view.reads_shared_rows_only if view.fallback_names != [WHOLE_MODEL] else None)
        return {**super().__getstate__(), "_view": None, "_entries": None, "_parameters_per_point": None,
                "_flat_views": None, "_one_point": None, "_sample_major": None, "_view_checks": checks}

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(): the view is rebuilt for the new tensors
        self._view = self._entries = self._parameters_per_point = self._flat_views = self._view_checks = None
        self._one_point = self._sample_major = None
        self._architecture = (self._architecture[0]._apply(fn),)
        return super()._apply(fn, recurse)

    def model_at_row(self, row: Tensor, *, bn_data: Any = None) -> nn.Module:
        """A plain copy of the architecture with the weights Σ_k row[k] θ_k. With `bn_data` (inputs, or (inputs,
        targets), tensors or batches), BatchNorm running statistics are recomputed there as the 2018 reference's
        update_bn does; otherwise they are the control points' statistics mixed by the row."""
        basis = self.basis()
        first = next(iter(basis.stacked.values()))
        row = torch.as_tensor(row).reshape(1, -1).to(device=first.device, dtype=first.dtype)
        state = basis.point(row[0])
        if bn_data is not None:
            batches = Batches(bn_data, "bn_data", targets_optional=True)
            device = next(iter(basis.stacked.values())).device
            view = SubspaceView(self.architecture, basis)
            view.prepare(row.to(device), move(batches.first[0], device))
            view.recompute_batchnorm(row.to(device), (move(inputs, device) for inputs, _ in batches))
            state |= {name: value[0] for name, value in view.recomputed_batchnorm_state().items()}
        model = copy.deepcopy(self.architecture)
        model.load_state_dict(state)
        return model.requires_grad_(True)

    def extra_repr(self) -> str:
        free = [k for k, point in enumerate(self.control_points) if any(p.requires_grad for p in point.parameters())]
        return f"control_points={self.size}, free={free}"
