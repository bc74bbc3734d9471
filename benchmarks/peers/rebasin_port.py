"""A straightforward port of the published weight-matching algorithm (Ainsworth et al. 2023, Alg. 1).

Per visited group: build the full cost matrix Σ_{(w,a)} mat_a(W_A) · mat_a(π_{−a}(W_B))ᵀ in torch, solve it with
`scipy.optimize.linear_sum_assignment` (maximize), visit groups in a random order each sweep, stop after a sweep
with no gain. This is the peer of workload B4; it is written for clarity, not speed, and lives outside the library.
The visiting order per sweep is drawn exactly as `modeconn_fast.rebasin` draws it, so both follow one trajectory.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def sweep_order(num_groups: int, seed: int, sweep: int) -> list[int]:
    """The group order of one sweep (the library's schedule)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sweep)
    return torch.randperm(num_groups, generator=generator).tolist()


def permuted(
    params: dict[str, Tensor],
    axes_to_perm: dict[str, tuple[str | None, ...]],
    perm: dict[str, Tensor],
    key: str,
    except_axis: int | None = None,
) -> Tensor:
    """params[key] with every permuted axis but `except_axis` taken through its group's permutation."""
    w = params[key]
    for axis, group in enumerate(axes_to_perm[key]):
        if axis != except_axis and group is not None:
            w = torch.index_select(w, axis, perm[group])
    return w


def cost_matrix(
    params_a: dict[str, Tensor],
    params_b: dict[str, Tensor],
    perm_to_axes: dict[str, list[tuple[str, int]]],
    axes_to_perm: dict[str, tuple[str | None, ...]],
    perm: dict[str, Tensor],
    group: str,
    n: int,
) -> Tensor:
    """Σ_{(w,a) in group} mat_a(W_A) · mat_a(π_{−a}(W_B))ᵀ, built from scratch."""
    cost = torch.zeros(n, n, dtype=params_a[perm_to_axes[group][0][0]].dtype)
    for key, axis in perm_to_axes[group]:
        w_a = torch.movedim(params_a[key], axis, 0).reshape(n, -1)
        w_b = torch.movedim(permuted(params_b, axes_to_perm, perm, key, axis), axis, 0).reshape(n, -1)
        cost += w_a @ w_b.T
    return cost


def weight_matching(
    params_a: dict[str, Tensor],
    params_b: dict[str, Tensor],
    perm_to_axes: dict[str, list[tuple[str, int]]],
    axes_to_perm: dict[str, tuple[str | None, ...]],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, Tensor], int]:
    """Returns the permutations (group -> LongTensor, B's unit perm[i] becomes unit i) and the sweeps run."""
    sizes = {g: params_a[axes[0][0]].shape[axes[0][1]] for g, axes in perm_to_axes.items()}
    perm = {g: torch.arange(n) for g, n in sizes.items()}
    names = list(perm_to_axes)
    sweeps = 0
    for sweep in range(max_iter):
        sweeps += 1
        progress = False
        for index in sweep_order(len(names), seed, sweep):
            group = names[index]
            n = sizes[group]
            cost = cost_matrix(params_a, params_b, perm_to_axes, axes_to_perm, perm, group, n)
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            col = torch.as_tensor(col)
            old = cost[torch.arange(n), perm[group]].sum().item()
            new = cost[torch.arange(n), col].sum().item()
            progress = progress or new > old + 1e-12
            perm[group] = col
        if not progress:
            break
    return perm, sweeps
