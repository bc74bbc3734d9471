"""The sparse, certified LAP returns the dense optimum, cold and warm-started."""
from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from modeconn_fast.rebasin import lap
from modeconn_fast.rebasin.lap import solve_lap


@pytest.fixture(autouse=True)
def sparse_path(monkeypatch):
    """Small matrices take the sparse path here (in use, sizes under lap.DENSE_BELOW go to scipy directly)."""
    monkeypatch.setattr(lap, "DENSE_BELOW", 100)


def optimum(cost: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(linear_sum_assignment(cost.double().numpy(), maximize=True)[1])


@pytest.mark.parametrize(("n", "rank", "seed"), [(300, 8, 0), (300, 300, 1), (257, 2, 2)])
def test_matches_the_dense_solver_cold_and_warm(n: int, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, rank, generator=generator), torch.randn(n, rank, generator=generator)
    cost = (a @ b.T).double()
    sigma, prices = solve_lap(cost)
    assert torch.equal(sigma, optimum(cost))
    for step in range(3):  # a sequence of nearby matrices, as the sweeps of weight matching produce
        moved = torch.randperm(rank, generator=generator)[: max(1, rank // 8)]
        b[:, moved] += 0.3 * torch.randn(n, len(moved), generator=generator)
        cost = (a @ b.T).double()
        sigma, prices = solve_lap(cost, prices=prices, hint=sigma)
        assert torch.equal(sigma, optimum(cost)), step


def test_certificate_holds() -> None:
    generator = torch.Generator().manual_seed(3)
    cost = torch.randn(400, 400, generator=generator, dtype=torch.float64)
    sigma, prices = solve_lap(cost)
    assert prices is not None
    reduced = cost - prices
    rows = torch.arange(400)
    assert torch.all(reduced.max(dim=1).values <= reduced[rows, sigma] + 1e-9)


def test_ties_and_small_sizes() -> None:
    cost = torch.ones(200, 200, dtype=torch.float64)  # every permutation is optimal
    sigma, _ = solve_lap(cost)
    assert torch.equal(torch.sort(sigma).values, torch.arange(200))
    small = torch.randn(5, 5, dtype=torch.float64)
    assert torch.equal(solve_lap(small)[0], optimum(small))
