"""Hessian-vector products of the loss at many points of a weight subspace, over the whole data.

    H(θ) v = ∇_θ ⟨∇_θ L(θ), v⟩,    L(θ) = (1/n) Σ_batches Σ_targets loss(model_θ(x), y)

(Pearlmutter 1994: double backward.) Products are taken for R "replicas" at once: replica r sits at the weights of
point owners[r] and multiplies its own vector (several replicas of one point carry e.g. several Lanczos problems
or Hutchinson probes). Vectors are flat over the model's parameters (`Layout`), in `named_parameters` order.

`ViewHessian`: the R replicas are the basis of a subspace view with identity coefficient rows, each replica's
weights a tensor that records gradients; one forward of the view and two backward passes per batch give all R
products (the points do not interact, so ∇ of Σ_r L_r w.r.t. replica r's weights is ∇L_r). `PointHessian`: the
plain reference, one replica after another through `torch.func.functional_call` and `torch.autograd.grad`.
Both use the model in eval mode (Dropout off, BatchNorm with the running statistics of the point's state).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..engine import SubspaceView
from ..engine.batches import Batches, move
from ..engine.metrics import LossFn
from ..engine.view import WHOLE_MODEL
from ..subspace import Basis


class Layout:
    """The model's parameters as one flat vector: names, shapes, and the slice of each layer (module)."""

    def __init__(self, model: nn.Module):
        parameters = list(model.named_parameters())
        if not parameters:
            raise ValueError("the model has no parameters: there is no Hessian to analyse")
        self.names = [name for name, _ in parameters]
        self.shapes = [p.shape for _, p in parameters]
        self.sizes = [p.numel() for _, p in parameters]
        self.dim = sum(self.sizes)
        self.layers: dict[str, slice] = {}  # named_parameters lists each module's own parameters together
        start = 0
        for name, size in zip(self.names, self.sizes):
            layer = name.rpartition(".")[0] or WHOLE_MODEL
            first = self.layers.get(layer, slice(start, start)).start
            self.layers[layer] = slice(first, start + size)
            start += size

    def split(self, flat: Tensor) -> list[Tensor]:
        """[R, D] -> one [R, *shape] per parameter."""
        return [part.reshape(flat.shape[0], *shape) for part, shape in zip(flat.split(self.sizes, dim=1), self.shapes)]

    def flatten(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def summed_loss(outputs: Tensor, targets: Tensor, loss_fn: LossFn | None) -> tuple[Tensor, int]:
    """Σ_r Σ_targets loss of the replicas' outputs [R, N, ...], and the targets per replica (the loss's weight).
    As the engine's metrics: cross-entropy by default; loss_fn per target (reduction='none') or a mean."""
    replicas = outputs.shape[0]
    flat = outputs.reshape(-1, *outputs.shape[2:])
    flat_targets = targets.unsqueeze(0).expand(replicas, *targets.shape).reshape(-1, *targets.shape[1:])
    if loss_fn is None:
        losses = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), flat_targets, reduction="none")
        return losses.sum(), losses.numel() // replicas
    losses = loss_fn(flat, flat_targets)
    if losses.dim() > 0 and losses.numel() % replicas == 0:
        return losses.sum(), losses.numel() // replicas
    samples = targets.shape[0]
    return sum(loss_fn(outputs[r], targets).reshape(()) for r in range(replicas)) * samples, samples


class _Hessian:
    """Shared by both paths: the points' states (every floating entry [P, ...]), the data, the loss."""

    def __init__(self, model: nn.Module, states: dict[str, Tensor], constants: dict[str, Tensor], layout: Layout,
                 data: Batches, loss_fn: LossFn | None, replicas_per_pass: int, bar: tqdm | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.states, self.constants, self.layout = states, constants, layout
        self.data, self.loss_fn, self.replicas_per_pass, self.bar = data, loss_fn, replicas_per_pass, bar
        self.device = next(iter(states.values())).device

    @torch.enable_grad()
    def __call__(self, owners: Tensor, vectors: Tensor) -> Tensor:
        """H(θ(owners[r])) vectors[r] for every r: [R, D] (also when called under torch.no_grad)."""
        out = torch.empty_like(vectors)
        for start in range(0, len(owners), self.replicas_per_pass):
            part = slice(start, start + self.replicas_per_pass)
            out[part] = self.products(owners[part], vectors[part])
        return out

    def products(self, owners: Tensor, vectors: Tensor) -> Tensor:
        raise NotImplementedError

    def _pass(self, forward: Callable[[Any], Tensor], weights: list[Tensor], vectors: list[Tensor]) -> Tensor:
        """Σ over the data of the double-backward products, divided by the loss's weight (targets per replica)."""
        total, weight = torch.zeros(vectors[0].shape[0], self.layout.dim, dtype=vectors[0].dtype,
                                    device=self.device), 0
        for inputs, targets in self.data:
            loss, count = summed_loss(forward(move(inputs, self.device)), targets.to(self.device), self.loss_fn)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vectors))
            products = torch.autograd.grad(dot, weights, allow_unused=True)
            total += self.layout.flatten([torch.zeros_like(w) if p is None else p for p, w in zip(products, weights)])
            weight += count
        if self.bar is not None:
            self.bar.update()
        return total / weight


class ViewHessian(_Hessian):
    """All replicas of a pass through one subspace view (see the module docstring)."""

    _view: SubspaceView | None = None
    _owners: Tensor | None = None

    def products(self, owners: Tensor, vectors: Tensor) -> Tensor:
        stacked = {name: t[owners.to(t.device)] for name, t in self.states.items()}
        weights = [stacked[name].requires_grad_() for name in self.layout.names]
        if self._owners is None or not torch.equal(self._owners, owners):
            # a view per set of replicas: buffers that are equal in every member are loaded once into its modules
            self._view = SubspaceView(self.model, Basis({n: t.detach() for n, t in stacked.items()}, self.constants))
            self._view.prepare(torch.eye(len(owners), dtype=vectors.dtype, device=self.device),
                               move(self.data.first[0], self.device))
            self._owners = owners.clone()
        view = self._view
        view.rebind(stacked)
        rows = torch.eye(len(owners), dtype=vectors.dtype, device=self.device)
        return self._pass(lambda inputs: view(rows, inputs), weights, self.layout.split(vectors))


class PointHessian(_Hessian):
    """The reference: one replica at a time, `functional_call` on the plain model and `torch.autograd.grad`."""

    def products(self, owners: Tensor, vectors: Tensor) -> Tensor:
        rows = []
        for owner, vector in zip(owners.tolist(), vectors):
            state = {name: t[owner] for name, t in self.states.items()}
            weights = [self.states[name][owner:owner + 1].clone().requires_grad_() for name in self.layout.names]
            state |= {name: w[0] for name, w in zip(self.layout.names, weights)} | self.constants
            model = self.model

            def forward(inputs: Any) -> Tensor:
                args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
                return functional_call(model, state, args).unsqueeze(0)

            rows.append(self._pass(forward, weights, self.layout.split(vector[None])))
        return torch.cat(rows)
