"""Spectral estimates of many symmetric operators at once, from their products with vectors only.

`operator(V) -> A V` acts on R independent problems at once (V [R, D]: one vector per problem, zero outside the
problem's own coordinates, given by `mask` [R, D]). Both estimators below run all R problems in lockstep, so
every product is one batched call (for Hessians: one pass of the subspace view over the data).

Lanczos (Lanczos 1950; with full reorthogonalisation, Golub & Van Loan §10.1): q_1 random; for j = 1, 2, …
    w = A q_j − α_j q_j − β_{j−1} q_{j−1},  α_j = q_jᵀ A q_j,  then w orthogonalised against q_1 … q_j (twice),
    β_j = ‖w‖,  q_{j+1} = w / β_j.
The eigenvalues θ_i of the tridiagonal T_j = tridiag(β, α, β) (Ritz values) approach the extreme eigenvalues of
A; with s_i the eigenvector of T_j, ‖A y_i − θ_i y_i‖ = β_j |s_i[j]|, and the top k are accepted when that
residual is at most tol·|θ_i| (or negligible against ‖T_j‖). The k largest algebraic eigenvalues are kept.

Hutchinson's estimator (Hutchinson 1989): tr(A) = E[zᵀ A z] for z with independent Rademacher (±1) entries;
its variance is 2(‖A‖_F² − Σ_i A_ii²). The mean over n probes is reported with its standard error s/√n; probes
stop when that error is at most tol·|mean|, or after `iterations` probes. As in PyHessian (Yao et al. 2020),
zᵀ(A z) restricted to a block of coordinates estimates that block's trace from the same probes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Operator = Callable[[Tensor], Tensor]


@dataclass
class LanczosResult:
    eigenvalues: Tensor  # [R, k] float64, descending
    steps: Tensor  # [R] products taken until the top k converged (or all that were taken)
    converged: Tensor  # [R] bool


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """±1 entries drawn on the CPU by `generator` (the same draws on any device)."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8) * 2 - 1
    return signs.to(device=device, dtype=dtype)


def lanczos_top(operator: Operator, mask: Tensor, top_k: int, iterations: int, tol: float,
                generator: torch.Generator) -> LanczosResult:
    """The `top_k` largest eigenvalues of each of the R operators restricted to mask[r] (see the module docstring).
    At most `iterations` products (and never more than a problem's dimension)."""
    replicas = mask.shape[0]
    dims = mask.sum(dim=1)
    steps_cap = min(iterations, int(dims.max()))
    q = rademacher(tuple(mask.shape), generator, mask.dtype, mask.device) * mask
    q = q / q.norm(dim=1, keepdim=True)
    basis = q.new_empty(steps_cap, *q.shape)  # the Lanczos vectors q_1 … q_m
    basis[0] = q
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    found = torch.full((replicas, top_k), float("nan"), dtype=torch.float64)
    steps = torch.zeros(replicas, dtype=torch.long)
    converged = torch.zeros(replicas, dtype=torch.bool)
    wanted = torch.arange(top_k)[None, :] < dims.cpu()[:, None]  # a problem of dimension d < k has d eigenvalues
    for j in range(steps_cap):
        w = operator(q) * mask
        alpha = (w * q).sum(dim=1)
        w = w - alpha[:, None] * q - (betas[-1][:, None] * basis[j - 1] if betas else 0)
        stacked = basis[:j + 1]
        for _ in range(2):  # full reorthogonalisation, twice (Kahan's "twice is enough")
            w = w - torch.einsum("jr,jrd->rd", torch.einsum("jrd,rd->jr", stacked, w), stacked)
        beta = w.norm(dim=1)
        alphas.append(alpha.double().cpu())
        betas.append(beta)
        size = j + 1
        ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, [b.double().cpu() for b in betas[:-1]]))
        top = _first_columns(ritz.flip(-1), top_k, float("nan"))
        residual = _first_columns(beta.double().cpu()[:, None] * vectors[:, -1, :].flip(-1).abs(), top_k, 0.0)
        scale = ritz.abs().amax(dim=1, keepdim=True)
        small = (residual <= tol * top.abs()) | (residual <= scale * torch.finfo(mask.dtype).eps ** 0.5)
        done = ((small | ~wanted) & (size >= wanted.sum(dim=1, keepdim=True))).all(dim=1)
        done |= size >= dims.cpu()  # the whole problem's space is spanned: T's spectrum is A's
        update = ~converged  # the newest estimates of the problems still running; converged ones keep theirs
        found[update], steps[update] = torch.where(wanted, top, float("nan"))[update], size
        converged |= done
        if bool(converged.all()) or size == steps_cap:
            break
        q = torch.where(beta[:, None] > 0, w / beta.clamp_min(torch.finfo(w.dtype).tiny)[:, None], torch.zeros_like(w))
        basis[size] = q
    return LanczosResult(found, steps, converged)


def _first_columns(values: Tensor, count: int, fill: float) -> Tensor:
    """values[:, :count], padded with `fill` where there are fewer columns."""
    if values.shape[1] >= count:
        return values[:, :count]
    return torch.cat([values, values.new_full((values.shape[0], count - values.shape[1]), fill)], dim=1)


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    """[R, j, j] symmetric tridiagonal matrices from the diagonals α (j of [R]) and off-diagonals β (j−1 of [R])."""
    matrix = torch.diag_embed(torch.stack(alphas, dim=1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, dim=1), offset=1)
        matrix = matrix + off + off.transpose(1, 2)
    return matrix


@dataclass
class TraceEstimate:
    trace: Tensor  # [P] float64: the mean of zᵀAz over the probes
    error: Tensor  # [P] its standard error s/√n (NaN after one probe)
    blocks: Tensor  # [P, B] the same for blocks of coordinates (zᵀ(Az) restricted to each block)
    block_errors: Tensor  # [P, B]
    probes: Tensor  # [P] probes taken


def hutchinson(operator: Callable[[Tensor, Tensor], Tensor], points: int, dim: int, blocks: list[slice],
               iterations: int, tol: float, probes_per_round: int, generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> TraceEstimate:
    """Hutchinson's trace of P operators; `operator(owners [R], Z [R, D]) -> A_owner Z` for R probes at once.
    Rounds of `probes_per_round` probes for every point not yet within tolerance, up to `iterations` probes."""
    samples: list[list[Tensor]] = [[] for _ in range(points)]  # per point, per probe: [1 + B] (whole, blocks)
    active = list(range(points))
    while active:
        per_point = min(probes_per_round, iterations - len(samples[active[0]]))
        owners = torch.tensor([p for p in active for _ in range(per_point)], dtype=torch.long)
        z = rademacher((len(owners), dim), generator, dtype, device)
        products = (z * operator(owners, z)).double().cpu()
        values = torch.stack([products.sum(dim=1), *(products[:, b].sum(dim=1) for b in blocks)], dim=1)
        for row, p in zip(values, owners.tolist()):
            samples[p].append(row)
        still = []
        for p in active:
            draws = torch.stack(samples[p])[:, 0]
            error = draws.std() / len(draws) ** 0.5 if len(draws) > 1 else torch.tensor(float("inf"))
            if len(draws) < iterations and not bool(error <= tol * draws.mean().abs()):
                still.append(p)
        active = still
    stacked = [torch.stack(s) for s in samples]  # [n_p, 1 + B]
    means = torch.stack([s.mean(dim=0) for s in stacked])
    errors = torch.stack([s.std(dim=0) / len(s) ** 0.5 if len(s) > 1 else torch.full_like(s[0], float("nan"))
                          for s in stacked])
    return TraceEstimate(means[:, 0], errors[:, 0], means[:, 1:], errors[:, 1:], torch.tensor([len(s) for s in stacked]))
