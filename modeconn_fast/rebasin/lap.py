"""Exact dense linear assignment through a sparse one, with a dual certificate.

maximise Σ_i C[i, σ(i)] over permutations σ. A dense solver (`scipy.optimize.linear_sum_assignment`) spends
O(n³) on matrices whose optimum uses, row by row, only a few of the best entries. So:
  1. keep, per row, the k best entries of C − p (p: column prices, e.g. from the last solve of a similar
     matrix) and the entry of a hint assignment (the previous σ, which keeps the sparse problem feasible);
  2. solve that sparse problem exactly (LAPJVsp, `scipy.sparse.csgraph.min_weight_full_bipartite_matching`);
  3. compute prices p certifying σ on the candidate graph: p_k ≥ p_j + C[i,k] − C[i,j] for every candidate
     (i, k) with j = σ(i) — longest paths over the columns (Bellman-Ford, vectorised over the candidates);
  4. check the prices on the dense matrix (LP duality): if max_k (C[i,k] − p_k) = C[i,σ(i)] − p_σ(i) for every
     row, then Σ_i C[i,τ(i)] ≤ Σ_i (C[i,σ(i)] − p_σ(i)) + Σ_k p_k = Σ_i C[i,σ(i)] for every τ: σ is optimal.
     Rows that violate it get their best entries added, and the loop repeats.
Any failure (no full matching among the candidates, prices that do not settle, no certificate after a few rounds) falls
back to the dense solver, so the answer is always an exact optimum.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

DENSE_BELOW = 1024  # under this size the dense solver is as fast (read at call time: tests lower it)
CANDIDATES = 32  # entries kept per row at first
ROUNDS = 16  # candidate enlargements before falling back to the dense solver (4 fell back 22 times at width 4096)
WARM_ROUNDS = 64  # Bellman-Ford rounds allowed to certify the hint
CHECK_EVERY = 8  # Bellman-Ford rounds between convergence checks


def solve_lap(cost: Tensor, *, prices: Tensor | None = None, hint: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(σ, p): an optimal assignment of `cost` ([n, n], maximised) and column prices certifying it (None when
    the dense solver answered). `prices` (from a similar matrix) and `hint` (e.g. the previous σ) only make it
    faster."""
    n = cost.shape[0]
    c = cost.double()
    if n < DENSE_BELOW:
        return _dense(c), None
    work = torch.empty_like(c)  # one n×n buffer for every dense pass
    p = torch.zeros(n, dtype=torch.float64) if prices is None else prices.double()
    candidates = torch.topk(torch.sub(c, p, out=work), min(CANDIDATES, n), dim=1, sorted=False).indices
    if hint is not None:
        candidates = torch.cat([candidates, hint[:, None]], dim=1)
    tolerance = 1e-12 * n * max(torch.gather(c, 1, candidates).abs().max().item(), 1.0)
    if hint is not None:
        certified = _certify(c, hint, candidates, p, tolerance, WARM_ROUNDS, work)
        if certified is not None and certified[1].numel() == 0:
            return hint, certified[0]
    for _ in range(ROUNDS):
        sigma = _sparse(c, p, candidates)
        if sigma is None:
            return _dense(c), None
        certified = _certify(c, sigma, candidates, p, tolerance, n, work)
        if certified is None:
            return _dense(c), None
        p, bad = certified
        if bad.numel() == 0:
            return sigma, p
        extra = sigma[:, None].repeat(1, CANDIDATES)  # rows without violations repeat their own entry (a no-op)
        extra[bad] = torch.topk(work[bad], CANDIDATES, dim=1, sorted=False).indices  # work holds c − p
        candidates = torch.cat([candidates, extra], dim=1)
    return _dense(c), None


def _certify(c: Tensor, sigma: Tensor, candidates: Tensor, start: Tensor, tolerance: float, rounds: int, work: Tensor):
    """Prices for σ on the candidates (from `start`) and the rows where they fail on the dense matrix, or None
    when the prices do not settle within `rounds` (σ is not optimal on the candidates). Leaves c − p in work."""
    p = _prices(c, sigma, candidates, start, rounds, tolerance)
    if p is None:
        return None
    reduced = torch.sub(c, p, out=work)
    slack = reduced.amax(dim=1) - reduced.gather(1, sigma[:, None]).squeeze(1)
    return p, torch.nonzero(slack > tolerance).flatten()


def _dense(c: Tensor) -> Tensor:
    return torch.as_tensor(linear_sum_assignment(c.numpy(), maximize=True)[1], dtype=torch.long)


def _unique(candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's candidate columns sorted, and a mask keeping the first of each repeat (rows without
    violations carry their own entry many times over)."""
    cols, _ = torch.sort(candidates, dim=1)
    keep = torch.ones_like(cols, dtype=torch.bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    return cols, keep


def _sparse(c: Tensor, p: Tensor, candidates: Tensor) -> Tensor | None:
    """Exact optimum over the candidate entries ([n, K] column indices, repeats allowed), or None when they
    hold no full matching."""
    n = c.shape[0]
    cols, keep = _unique(candidates)
    values = (torch.gather(c, 1, cols) - p[cols])[keep]
    weights = (values.max() - values + 1.0).numpy()  # min-weight form, all weights ≥ 1 (zero means no edge)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(dim=1).numpy())])
    graph = csr_matrix((weights, cols[keep].numpy(), indptr), shape=(n, n))
    try:
        _, col = min_weight_full_bipartite_matching(graph)
    except ValueError:
        return None
    return torch.as_tensor(col, dtype=torch.long)


def _prices(c: Tensor, sigma: Tensor, candidates: Tensor, start: Tensor, rounds: int, tolerance: float) -> Tensor | None:
    """Column prices p ≥ start with p_k ≥ p_σ(i) + C[i,k] − C[i,σ(i)] on every candidate (i, k): longest paths
    over the columns (Bellman-Ford, one vectorised relaxation of all candidates per round; a warm start from
    the prices of a similar matrix settles in few rounds). Settled: no price rose by more than `tolerance` in
    the last rounds (rounding can make a zero-weight cycle creep). None if they do not settle within `rounds`."""
    n = candidates.shape[0]
    cols, keep = _unique(candidates)
    gain = (torch.gather(c, 1, cols) - c[torch.arange(n), sigma][:, None])[keep]  # one per distinct candidate
    source = sigma.repeat_interleave(keep.sum(dim=1))  # the column whose price each candidate's bound starts from
    flat = cols[keep]
    p = start - start.min()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rounds of small ops: waking a second thread costs more than it brings
    try:
        for _ in range(0, rounds, CHECK_EVERY):
            before = p
            for _ in range(CHECK_EVERY):
                p = p.scatter_reduce(0, flat, torch.index_select(p, 0, source).add_(gain), reduce="amax")
            if (p - before).max().item() <= tolerance:
                return p
        return None
    finally:
        torch.set_num_threads(threads)
