"""Curvature of the loss at every point of a weight subspace: top Hessian eigenvalues and the Hessian's trace.

    H(p) = ∇²_θ L(θ) at θ(p) = Σ_k coeffs[p,k] θ_k,    L = the mean loss over ALL the data (batches accumulated)

The k largest (algebraic) eigenvalues by Lanczos and tr H(p) by Hutchinson's estimator (`lanczos.py`), from
Hessian-vector products (`hessian.py`) that serve many points in one pass of the subspace view. Per layer:
the same for each diagonal block H_ll (the Hessian w.r.t. one module's own parameters, others fixed), as
PyHessian (Yao et al. 2020) reports per layer. The whole-data Hessian, not one minibatch's: estimates from a
single minibatch vary several-fold.

BatchNorm: the Hessian of the model in eval mode, with per-point running statistics held fixed: recomputed for
every point from `bn_data` (bn="recompute", or "auto" with bn_data) or mixed from the members' (bn="eval").
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine import SubspaceView
from ..engine.batches import Batches, move
from ..engine.evaluate import BatchNormMode, batchnorm_mode
from ..engine.metrics import LossFn
from ..ops import mix, resolve_backend
from ..subspace import Basis, StateLike, as_basis
from .hessian import Layout, PointHessian, ViewHessian
from .lanczos import hutchinson, lanczos_top

CPU_MEMORY_BUDGET = 1 << 30  # bytes for one pass's replicas: their Lanczos vectors, weights and autograd graphs
GRAPH_FACTOR = 3  # a double backward keeps about this many copies of the forward's activations


@dataclass
class CurvatureResult:
    """Per point p: `eigenvalues[p]` the top_k largest Hessian eigenvalues, descending (NaN past a block's
    dimension); `trace[p]` Hutchinson's estimate of tr H and `trace_error[p]` its standard error (None unless
    asked); `converged[p]` whether Lanczos met `tol` for all top_k within `iterations`, `steps[p]` the products
    it took; `per_layer[name]` the same for each layer's diagonal block (None unless asked); `bn_mode` how
    BatchNorm ran; `t` the path parameter of each point (from `curvature_along`), else None. All float64."""

    eigenvalues: Tensor
    trace: Tensor | None
    trace_error: Tensor | None
    converged: Tensor
    steps: Tensor
    bn_mode: str
    per_layer: dict[str, "CurvatureResult"] | None = None
    t: Tensor | None = field(default=None)

    @property
    def top(self) -> Tensor:
        """The largest eigenvalue at every point, [P] (the "sharpness")."""
        return self.eigenvalues[:, 0]


def curvature(model: nn.Module, basis: Basis | Sequence[StateLike], coeffs: Tensor, data: Any, *, top_k: int = 1,
              trace: bool = False, per_layer: bool = False, iterations: int = 100, tol: float = 1e-3, seed: int = 0,
              loss_fn: LossFn | None = None, bn: BatchNormMode = "auto", bn_data: Any = None, batched: bool = False,
              memory_budget: int | None = None, progress: bool | None = None) -> CurvatureResult:
    """Top Hessian eigenvalues (and optionally its trace, and both per layer) of the loss over all of `data` at
    every point θ(p) = Σ_k coeffs[p,k] basis[k] (see the module docstring).

    model, basis, coeffs [P, K], data, loss_fn, bn, bn_data: as for `evaluate`. top_k: how many of the largest
    eigenvalues. trace: also Hutchinson's trace (Rademacher probes until the standard error is at most tol·|trace|,
    at most `iterations` probes). per_layer: also per layer (module), by name. iterations: the most Lanczos steps
    (each one product with H over all the data). tol: Lanczos stops when every wanted Ritz pair's residual
    ‖H y − θ y‖ is at most tol·|θ|. seed: the random start vectors and probes. batched: many points per pass of
    the subspace view (off by default: on the CPU it measured no faster than, and on wide layers half as fast
    as, the plain per-point path, functional_call + autograd; that path is also used where the ops would run
    Triton kernels, whose backward is not differentiable twice). memory_budget: bytes for one
    pass (default 1 GiB on CPU, a quarter of the free memory on GPU).
    """
    basis = as_basis(basis, model)
    first = next(iter(basis.stacked.values()))
    device, dtype = first.device, first.dtype
    coeffs = torch.as_tensor(coeffs)
    if coeffs.dim() != 2 or coeffs.shape[1] != basis.size or coeffs.shape[0] == 0:
        raise ValueError(f"coeffs must have shape [points ≥ 1, {basis.size}] (one column per basis member), "
                         f"got {tuple(coeffs.shape)}")
    coeffs = coeffs.to(device=device, dtype=dtype)
    layout = Layout(model)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer (how many of the largest eigenvalues), got {top_k!r}")
    if top_k > layout.dim:
        raise ValueError(f"top_k={top_k} is larger than the number of parameters ({layout.dim}): the Hessian has "
                         f"only {layout.dim} eigenvalues")
    if iterations < top_k:
        raise ValueError(f"iterations={iterations} Lanczos steps cannot give top_k={top_k} eigenvalues: "
                         "use iterations ≥ top_k (more for accuracy)")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    batches = Batches(data, "data")
    states, bn_mode = _point_states(model, basis, coeffs, batches, bn, bn_data)

    blocks = {"": slice(0, layout.dim)} | (layout.layers if per_layer else {})
    points = coeffs.shape[0]
    replicas = _replicas_per_pass(model, states, layout, batches, iterations, memory_budget, device)
    batched = batched and resolve_backend(None, device, dtype) == "torch"
    hessian_type = ViewHessian if batched else PointHessian
    bar = tqdm(desc="curvature", unit="pass", delay=0.0 if progress else 1.0, disable=progress is False, leave=False)
    with bar:
        hessian = hessian_type(model, states, basis.constants, layout, batches, loss_fn, replicas, bar)
        generator = torch.Generator().manual_seed(seed)
        # one Lanczos problem per (point, block), point-major; a group of them shares every pass over the data
        owners = torch.arange(points).repeat_interleave(len(blocks))
        mask = torch.zeros(len(owners), layout.dim, dtype=dtype, device=device)
        for index, block in enumerate(blocks.values()):
            mask[index::len(blocks), block] = 1
        eigenvalues, steps, converged = [], [], []
        for start in range(0, len(owners), replicas):
            group = slice(start, start + replicas)
            found = lanczos_top(lambda vectors, group=group: hessian(owners[group], vectors), mask[group], top_k,
                                iterations, tol, generator)
            eigenvalues.append(found.eigenvalues), steps.append(found.steps), converged.append(found.converged)
        traces = None
        if trace:
            traces = hutchinson(hessian, points, layout.dim, list(blocks.values())[1:], iterations, tol,
                                max(2, replicas // points), generator, dtype, device)
    values = torch.cat(eigenvalues).reshape(points, len(blocks), top_k)
    steps_of = torch.cat(steps).reshape(points, len(blocks))
    converged_of = torch.cat(converged).reshape(points, len(blocks))
    if not bool(converged_of.all()):
        warnings.warn(f"Lanczos did not reach tol={tol} within iterations={iterations} at "
                      f"{int((~converged_of).any(dim=1).sum())} of {points} points (see `converged`): raise iterations "
                      "or tol", stacklevel=2)

    def result(block: int) -> CurvatureResult:
        trace_values = trace_errors = None
        if traces is not None:
            trace_values = traces.trace if block == 0 else traces.blocks[:, block - 1]
            trace_errors = traces.error if block == 0 else traces.block_errors[:, block - 1]
        return CurvatureResult(values[:, block], trace_values, trace_errors, converged_of[:, block], steps_of[:, block],
                               bn_mode)

    whole = result(0)
    if per_layer:
        whole.per_layer = {name: result(index + 1) for index, name in enumerate(layout.layers)}
    return whole


def curvature_along(path: Any, data: Any, *, points: int = 25, **options: Any) -> CurvatureResult:
    """Curvature at `points` evenly spaced t ∈ [0, 1] of a path ("sharpness along the path"): `path` is a pair of
    models (the straight line (1 − t) θ_A + t θ_B) or a curve (any object with `architecture`, `basis()` and
    `coefficients(t)`, e.g. a BezierCurve). The result carries `t`; options go to `curvature` (top_k, trace,
    per_layer, bn_data, ...). Along a curve pass bn_data: its control points' running statistics mean nothing."""
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    if isinstance(path, (tuple, list)) and len(path) == 2 and all(isinstance(m, nn.Module) for m in path):
        architecture, basis, coeffs = path[0], [path[0], path[1]], torch.stack([1 - t, t], dim=1)
    elif all(hasattr(path, name) for name in ("architecture", "basis", "coefficients")):
        with torch.no_grad():
            architecture, basis, coeffs = path.architecture, path.basis(), path.coefficients(t).detach()
    else:
        raise TypeError("path must be a pair of models (model_a, model_b) or a curve (e.g. a BezierCurve), got "
                        f"{type(path).__name__}")
    result = curvature(architecture, basis, coeffs, data, **options)
    result.t = t
    return result


def _point_states(model: nn.Module, basis: Basis, coeffs: Tensor, batches: Batches, bn: str,
                  bn_data: Any) -> tuple[dict[str, Tensor], str]:
    """Every floating entry of every point's state, [P, ...]: Σ_k c[p,k] θ_k, with the BatchNorm running statistics
    recomputed from bn_data where that is the mode (one pass of a subspace view for all points)."""
    states = {name: mix(coeffs, tensor) for name, tensor in basis.stacked.items()}
    view = SubspaceView(model, basis)
    view.prepare(coeffs, move(batches.first[0], coeffs.device))
    mode = batchnorm_mode(bn, view, bn_data)
    if mode == "recompute":
        bn_batches = Batches(bn_data, "bn_data", targets_optional=True)
        with torch.no_grad():
            view.recompute_batchnorm(coeffs, (move(inputs, coeffs.device) for inputs, _ in bn_batches))
        states |= view.recomputed_batchnorm_state()
    return states, mode


def _replicas_per_pass(model: nn.Module, states: dict[str, Tensor], layout: Layout, batches: Batches, iterations: int,
                       memory_budget: int | None, device: torch.device) -> int:
    """Replicas (Lanczos problems or probes) per pass, and rows per batch of a tensor dataset, under the budget:
    each replica keeps its Lanczos vectors, weights and gradients, and the autograd graph of its batch."""
    if memory_budget is None:
        memory_budget = int(torch.cuda.mem_get_info(device)[0] // 4) if device.type == "cuda" else CPU_MEMORY_BUDGET
    itemsize = next(iter(states.values())).element_size()
    fixed = (iterations + 6) * layout.dim * itemsize
    per_row = GRAPH_FACTOR * _activation_bytes(model, {n: t[0] for n, t in states.items()}, batches, device)
    if batches.rows is not None:
        batches.batch_size = max(1, min(batches.rows, memory_budget // (8 * per_row)))
        rows = batches.batch_size
    else:
        inputs = batches.first[0]
        rows = (inputs if isinstance(inputs, Tensor) else inputs[0]).shape[0]
    return max(1, memory_budget // (fixed + rows * per_row))


def _activation_bytes(model: nn.Module, state: dict[str, Tensor], batches: Batches, device: torch.device) -> int:
    """Bytes of all module outputs for one sample (what a forward keeps for backward, roughly)."""
    total = [0]

    def record(_module: nn.Module, _args: object, out: object) -> None:
        if isinstance(out, Tensor):
            total[0] += out.numel() * out.element_size()

    inputs = batches.first[0]
    row = inputs[:1] if isinstance(inputs, Tensor) else tuple(x[:1] for x in inputs)
    probe = copy.deepcopy(model).eval()
    probe.load_state_dict(state, strict=False)
    hooks = [m.register_forward_hook(record) for m in probe.modules()]
    with torch.no_grad():
        probe(*((move(row, device),) if isinstance(row, Tensor) else move(row, device)))
    for hook in hooks:
        hook.remove()
    return max(total[0], 1)

