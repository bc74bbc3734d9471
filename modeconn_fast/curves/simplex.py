"""Low-loss simplexes (SPRO, Benton et al. 2021): vertices θ_0 … θ_{K−1}, points Σ_i α_i θ_i with α on the simplex.

SPRO starts from a trained model as vertex 0 (fixed) and adds vertices one at a time. Each new vertex starts at
the centroid of the current ones and is the only one trained, minimising

    E_{α ~ Dirichlet(1)} [ L(Σ_i α_i θ_i) + ½·wd·‖Σ_i α_i θ_i‖² ]  −  λ · log V

where V is the simplex's volume from the Cayley–Menger determinant (parameters only, float64):

    V² = (−1)^{d+1} / (2^d (d!)²) · det [[0, 1ᵀ], [1, D]],   d = K − 1,   D_ij = ‖θ_i − θ_j‖² = G_ii + G_jj − 2 G_ij

with G the Gram matrix of the vertices taken relative to vertex 0 (exact distances in float32 weights). The
log is taken of √(V² + ε) (ε = 1e-4) so that a new vertex at the centroid (V = 0) has a finite loss. Each
minibatch draws `samples_per_step` rows α, all run in one pass of the subspace view on the same minibatch.
ESPRO (`espro`) trains one simplex from each of several models; its ensemble samples all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.batches import Batches, move
from ..engine.outputs import OutputSelector
from ..subspace import check_same_entries
from .ensemble import Ensemble
from .trainable import TrainableSubspace
from .train import minibatches

VOLUME_EPSILON = 1e-4


def squared_volume(gram: Tensor) -> Tensor:
    """V² of the simplex whose K vertices have the Gram matrix `gram` [K, K] (Cayley–Menger; differentiable)."""
    k = gram.shape[0]
    d = k - 1
    diagonal = gram.diagonal()
    distances = diagonal[:, None] + diagonal[None, :] - 2 * gram
    menger = torch.ones(k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    menger[0, 0] = 0
    menger[1:, 1:] = distances
    sign = -1.0 if d % 2 == 0 else 1.0  # (−1)^{d+1}
    return sign * torch.linalg.det(menger) / (2 ** d * math.factorial(d) ** 2)


def dirichlet_rows(n: int, k: int, generator: torch.Generator) -> Tensor:
    """n rows α ~ Dirichlet(1, …, 1) over k vertices (normalised exponentials), float64 [n, k]."""
    exponentials = -torch.log1p(-torch.rand(n, k, generator=generator, dtype=torch.float64))  # −log U, U ∈ (0, 1]
    return exponentials / exponentials.sum(dim=1, keepdim=True)


@dataclass
class SimplexHistory:
    """Per added vertex: the mean training loss of each epoch (data loss + weight decay − λ·log V) and the
    simplex's volume after that vertex was trained."""

    loss: list[list[float]] = field(default_factory=list)
    volume: list[float] = field(default_factory=list)


class Simplex(TrainableSubspace):
    """A simplex of models of one architecture: `control_points[i]` is vertex i, vertex 0 the starting model.

    `sample(n)` gives barycentric rows over `basis()`; `model_at(alpha)` a plain model at one point; `predict`
    the mean class probabilities of sampled points, all in one pass of the subspace view. `output` picks the
    logits of a model that returns a tuple, dict or dataclass, as in `evaluate`.
    """

    def __init__(self, model: nn.Module, *, output: OutputSelector = None):
        super().__init__(model)
        self.output = output
        self.add_point(model.state_dict(), trainable=False)
        self.history = SimplexHistory()

    @property
    def vertices(self) -> int:
        return self.size

    def add_vertex(self) -> nn.Module:
        """Freeze every vertex and add a trainable one at their centroid (Benton et al.'s initialisation)."""
        self.control_points.requires_grad_(False)
        states = [point.state_dict() for point in self.control_points]
        centroid = {name: torch.stack([s[name] for s in states]).mean(dim=0) if torch.is_floating_point(first)
                    else first.clone() for name, first in states[0].items()}
        return self.add_point(centroid, trainable=True)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """n coefficient rows α ~ Dirichlet(1) over the vertices (`basis()`): float64 [n, vertices]."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer ≥ 1 (points to sample), got {n!r}")
        return dirichlet_rows(n, self.size, torch.Generator().manual_seed(seed))

    def log_volume(self, stacked: dict[str, Tensor] | None = None) -> Tensor:
        """log √(V² + ε) of the simplex over the model's parameters (float64, differentiable)."""
        flat = self.flat_parameters(stacked)
        relative = (flat - flat[0]).double()  # vertex 0 at the origin: distances without cancellation
        return 0.5 * (squared_volume(relative @ relative.T).clamp_min(0) + VOLUME_EPSILON).log()

    def volume(self) -> float:
        """The simplex's d-dimensional volume over the model's parameters (d = vertices − 1)."""
        with torch.no_grad():
            flat = self.flat_parameters()
            relative = (flat - flat[0]).double()
            return float(squared_volume(relative @ relative.T).clamp_min(0).sqrt())

    def model_at(self, alpha: Sequence[float] | Tensor, *, bn_data: Any = None) -> nn.Module:
        """A plain copy of the architecture at Σ_i alpha_i θ_i (alpha on the simplex); BatchNorm statistics are
        recomputed from `bn_data` when given, else mixed from the vertices'."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
        if alpha.shape[0] != self.size or bool((alpha < 0).any()) or abs(float(alpha.sum()) - 1) > 1e-6:
            raise ValueError(f"alpha must be {self.size} non-negative weights summing to 1, got {alpha.tolist()}")
        return self.model_at_row(alpha, bn_data=bn_data)

    @torch.no_grad()
    def predict(self, x: Tensor | tuple[Tensor, ...], n: int = 10, *, seed: int = 0) -> Tensor:
        """The ensemble of n sampled points: mean softmax probabilities [N, classes], all points in one pass of
        the view in eval mode (BatchNorm mixes the vertices' stored statistics). For BatchNorm recomputation,
        uncertainty and metrics use `ensemble`."""
        was_training = self.training
        self.eval()
        try:
            return self.outputs(x, self.sample(n, seed)).softmax(dim=-1).mean(dim=0)
        finally:
            self.train(was_training)

    def ensemble(self, n: int = 10, *, seed: int = 0, bn_data: Any = None) -> Ensemble:
        """An `Ensemble` of n points sampled from the simplex (`sample(n, seed)`), BatchNorm statistics recomputed
        for each from `bn_data` when given."""
        return Ensemble.from_basis(self.architecture, self.basis(), self.sample(n, seed), bn_data=bn_data,
                                   output=self.output)


def train_simplex(model: nn.Module, train_data: Any, *, vertices: int = 3, epochs: int, lr: float, reg: float = 0.01,
                  samples_per_step: int = 5, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, seed: int = 0,
                  output: OutputSelector = None, progress: bool = True) -> Simplex:
    """SPRO (Benton et al. 2021): a simplex of `vertices` vertices grown from the trained `model` (vertex 0).

    Each added vertex trains for `epochs` epochs with SGD (momentum, cosine learning rate from `lr` to 0, as the
    reference), on the loss of the module docstring with λ = `reg`. train_data: `(inputs, targets)` tensors,
    shuffled into minibatches of `batch_size` from `seed`, or any re-iterable of batches. loss_fn: mean loss of
    outputs [B, ...] against targets (default cross-entropy). output: which part of a tuple, dict or dataclass
    output holds the logits, as in `evaluate`. The result's `history` has the per-epoch losses.
    """
    if not isinstance(vertices, int) or vertices < 2:
        raise ValueError(f"vertices must be an integer ≥ 2 (the starting model plus one or more), got {vertices!r}")
    _check_training(epochs, lr, reg, samples_per_step, batch_size)
    data = Batches(train_data, "train_data")
    simplex = Simplex(model, output=output)
    loss_fn = loss_fn or F.cross_entropy
    generator = torch.Generator().manual_seed(seed)
    simplex.train()
    for vertex in range(1, vertices):
        free = list(simplex.add_vertex().parameters())
        optimizer = torch.optim.SGD(free, lr=lr, momentum=momentum, weight_decay=0.0)
        losses = []
        bar = tqdm(range(epochs), desc=f"simplex vertex {vertex}", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
            loss_sum, samples = 0.0, 0
            for inputs, targets in minibatches(data, batch_size, generator):
                alphas = dirichlet_rows(samples_per_step, simplex.size, generator)
                loss = simplex_loss(simplex, move(inputs, free[0].device), targets.to(free[0].device), alphas,
                                    loss_fn, weight_decay, reg)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * targets.shape[0]
                samples += targets.shape[0]
            losses.append(loss_sum / samples)
        simplex.history.loss.append(losses)
        simplex.history.volume.append(simplex.volume())
    return simplex.eval()


def simplex_loss(simplex: Simplex, inputs: Any, targets: Tensor, alphas: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], weight_decay: float, reg: float) -> Tensor:
    """Mean over the rows α of L(θ(α)) + ½·wd·‖θ(α)‖², minus λ·log V: all rows in one pass of the view."""
    stacked = simplex.stacked()
    first = next(iter(stacked.values()))
    rows = alphas.to(device=first.device, dtype=first.dtype)
    outputs = simplex.outputs(inputs, rows, stacked)  # [S, B, ...]
    points = outputs.shape[0]
    loss = loss_fn(outputs.reshape(-1, *outputs.shape[2:]),
                   targets.unsqueeze(0).expand(points, *targets.shape).reshape(-1, *targets.shape[1:]))
    if weight_decay:
        loss = loss + 0.5 * weight_decay * torch.einsum("pk,kl,pl->p", rows, simplex.gram(stacked), rows).mean()
    if reg:
        loss = loss - reg * simplex.log_volume(stacked).to(loss.dtype)
    return loss


def espro(models: Sequence[nn.Module], train_data: Any, **options: Any) -> list[Simplex]:
    """ESPRO (Benton et al. 2021): one SPRO simplex from each model (same options; model i uses seed + i).
    The ensemble of the simplexes samples points of every one."""
    models = list(models)
    if not models:
        raise ValueError("espro needs at least one starting model")
    for index, other in enumerate(models[1:], start=1):
        check_same_entries(models[0], other, "models[0]", f"models[{index}]")
    seed = options.pop("seed", 0)
    return [train_simplex(model, train_data, seed=seed + index, **options) for index, model in enumerate(models)]


def _check_training(epochs: int, lr: float, reg: float, samples_per_step: int, batch_size: int) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not reg >= 0:
        raise ValueError(f"reg (λ, the weight of −log volume) must be ≥ 0, got {reg!r}")
    if not isinstance(samples_per_step, int) or samples_per_step < 1:
        raise ValueError(f"samples_per_step must be an integer ≥ 1 (points α per minibatch), got {samples_per_step!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
