"""The certified LAP returns the dense optimum, cold and warm-started."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rebasin_models import mlp
from scipy.optimize import linear_sum_assignment

from modeconn_fast.background_load import BackgroundLoad
from modeconn_fast.rebasin import lap, lap_loading, weight_matching
from modeconn_fast.rebasin.lap import solve_lap


@pytest.fixture(autouse=True, params=["candidates", "whole rows"])
def sparse_path(monkeypatch, request):
    """Small matrices take the certified path here (in use, sizes under lap.DENSE_BELOW go to scipy directly):
    the candidates' and, up to PATHS_UP_TO, the whole rows' (`_dense_rounds`)."""
    monkeypatch.setattr(lap, "DENSE_BELOW", 100)
    monkeypatch.setattr(lap, "PATHS_UP_TO", 0 if request.param == "candidates" else 10**6)


def optimum(cost: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(linear_sum_assignment(cost.double().numpy(), maximize=True)[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: read as given, no float64 copy
@pytest.mark.parametrize(("n", "rank", "seed"), [(300, 8, 0), (300, 300, 1), (257, 2, 2)])
def test_matches_the_dense_solver_cold_and_warm(n: int, rank: int, seed: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, rank, generator=generator), torch.randn(n, rank, generator=generator)
    cost = (a @ b.T).to(dtype)
    sigma, warm = solve_lap(cost)
    assert torch.equal(sigma, optimum(cost))
    for step in range(3):  # a sequence of nearby matrices, as the sweeps of weight matching produce
        moved = torch.randperm(rank, generator=generator)[: max(1, rank // 8)]
        b[:, moved] += 0.3 * torch.randn(n, len(moved), generator=generator)
        cost = (a @ b.T).to(dtype)
        sigma, warm = solve_lap(cost, warm)
        assert warm is not None, "fell back to the dense solver"
        assert torch.equal(sigma, optimum(cost)), step


@pytest.mark.parametrize(("rank", "hubs"), [(2, True), (400, False)])
def test_the_auction_starts_where_few_rows_hold_the_column_maxima(monkeypatch, rank: int, hubs: bool) -> None:
    """A cold solve by candidates starts with an auction where few rows hold the columns' maxima (a rank-2
    product: the extreme rows of a plane hold them all), and goes straight to the paths on a random matrix
    (about 1 − 1/e of the rows hold one); the optimum either way, and `_column_maxima` as torch's."""
    generator = torch.Generator().manual_seed(rank)
    factor = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    cost = factor(400, rank) @ factor(rank, 400)
    maxima, share = lap._column_maxima(cost.numpy())
    assert torch.equal(torch.from_numpy(maxima), cost.amax(dim=0))
    assert share == len(torch.unique(cost.argmax(dim=0))) / 400
    assert (share < lap.AUCTION_SHARE) == hubs
    auction, calls = lap._auction, []

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        return auction(*args)

    monkeypatch.setattr(lap, "_auction", counted)
    sigma, _ = lap._solve_by_candidates(cost.numpy(), None, None)
    assert len(calls) == hubs
    assert torch.equal(sigma, optimum(cost))


def test_certificate_holds() -> None:
    generator = torch.Generator().manual_seed(3)
    cost = torch.randn(400, 400, generator=generator, dtype=torch.float64)
    sigma, warm = solve_lap(cost)
    assert warm is not None and torch.equal(warm.sigma, sigma)
    reduced = cost - warm.prices
    rows = torch.arange(400)
    assert torch.all(reduced.max(dim=1).values <= reduced[rows, sigma] + 1e-9)


def test_candidates_without_a_full_matching() -> None:
    """Every row ranks the same 40 columns first, so the candidates alone hold no perfect matching: the
    augmenting paths must search whole rows."""
    generator = torch.Generator().manual_seed(4)
    n = 300
    popularity = torch.zeros(n, dtype=torch.float64)
    popularity[: lap.CANDIDATES + 8] = 10.0  # every row's candidates lie among these columns
    cost = popularity + torch.rand(n, n, generator=generator, dtype=torch.float64)
    sigma, warm = solve_lap(cost)
    assert warm is not None, "fell back to the dense solver"
    assert torch.equal(sigma, optimum(cost))


def test_ties_and_small_sizes() -> None:
    cost = torch.ones(200, 200, dtype=torch.float64)  # every permutation is optimal
    sigma, _ = solve_lap(cost)
    assert torch.equal(torch.sort(sigma).values, torch.arange(200))
    small = torch.randn(5, 5, dtype=torch.float64)
    assert torch.equal(solve_lap(small)[0], optimum(small))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the way to the error
def test_non_finite_entries_raise() -> None:
    cost = torch.randn(300, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cost[5, :] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve_lap(cost)


def test_scipy_answers_while_the_compiled_solver_loads(monkeypatch) -> None:
    """Before the load completes, small LAPs get scipy's exact optimum at once (and no warm start)."""
    monkeypatch.setattr(lap_loading, "_loading", BackgroundLoad(lambda: None, "never started"))  # as if loading
    cost = torch.randn(300, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma, warm = lap_loading.solve(cost)
    assert warm is None and torch.equal(sigma, optimum(cost))


COMPILED = ("_row_best", "_top_columns", "_gather", "_auction", "_augment", "_dense_rounds")  # called from Python


def test_warm_up_compiles_every_signature_that_matching_uses() -> None:
    """After warm_up, a weight matching on the certified path compiles nothing new (so the install-time warm-up
    leaves numba's cache complete): in a fresh process with the module's own sizes (the fixture's lowered ones
    would send warm_up's small matrices down the path it is asked for), then here."""
    code = ("from modeconn_fast.rebasin import lap; lap.warm_up(); "
            f"print([len(getattr(lap, name).signatures) for name in {COMPILED}])")
    counts = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert counts.strip() == str([2] * len(COMPILED))  # float64 and float32 costs, by both paths
    lap.warm_up()
    compiled = [getattr(lap, name) for name in COMPILED]
    assert all(len(f.signatures) == 2 for f in compiled)
    lap_loading.wait()
    torch.manual_seed(0)
    model_a, model_b = mlp((64, 128, 128, 10)), mlp((64, 128, 128, 10))
    weight_matching(model_a, model_b, example_input=torch.randn(2, 64))
    assert all(len(f.signatures) == 2 for f in compiled)


def test_a_fresh_process_first_call_loads_neither_sympy_nor_waits() -> None:
    """The fresh-process measurement of benchmarks/rebasin_first_call.py runs (exit status 0 although the
    compiled LAP starts loading as the first call returns), and deriving the spec does not import sympy."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.rebasin_first_call import measure_once

    run = measure_once(threads=1)
    assert run["sympy_loaded"] is False
    assert run["first_s"] > 0 and run["warm_s"] > 0


def test_a_process_ending_during_the_load_exits_cleanly() -> None:
    """The loading thread is joined at exit: numba killed midway would abort the interpreter (status 134)."""
    for code in ("from modeconn_fast.rebasin import lap_loading; lap_loading.start()",
                 "from modeconn_fast.engine import compiled_cpu; compiled_cpu.load()"):
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("columns", "levels"), [(10, 0), (77, 0), (512, 0), (700, 0), (700, 3)])  # 3 levels: ties
def test_candidates_are_the_best_columns_of_each_row(dtype: torch.dtype, columns: int, levels: int) -> None:
    """`_row_top` through `_best_columns`: rows of fewer chunks than candidates (10 and 77 columns) in one pass
    through the heap, longer ones by the chunks' threshold (512: exactly 32 chunks for 32 candidates; 700: 43 chunks
    and a last part); the same values as topk either way, ties included, each column once."""
    generator = torch.Generator().manual_seed(7)
    if levels == 0:
        cost = torch.randn(90, columns, generator=generator).to(dtype)
        prices = torch.randn(columns, generator=generator, dtype=torch.float64)
    else:
        cost = torch.randint(0, levels, (90, columns), generator=generator).to(dtype)
        prices = torch.zeros(columns, dtype=torch.float64)
    rows = torch.tensor([5, 0, 89, 40])
    picked = torch.from_numpy(lap._best_columns(cost.numpy(), rows.numpy(), prices.numpy()))
    reduced = cost[rows].double() - prices
    k = min(lap.CANDIDATES, columns)
    assert picked.shape == (4, k)
    chosen = torch.gather(reduced, 1, picked).sort(dim=1).values
    assert torch.equal(chosen, reduced.topk(k, dim=1).values.sort(dim=1).values)
    assert all(len(set(row.tolist())) == k for row in picked)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("levels", [0, 3])  # 0: random values; 3: ties at the maximum
def test_row_reductions_equal_plain_loops(dtype: torch.dtype, levels: int) -> None:
    """The vectorised reductions (`_row_best` with and without a skipped column, the auction's `_top_two`,
    `_least`) give the numbers of a plain loop: NaN entries skipped, the lowest column among tied maxima, the
    second best over the other columns (a tie with the first included), odd lengths."""
    generator = torch.Generator().manual_seed(11 + levels)
    rows, columns = 37, 203
    if levels:
        cost = torch.randint(0, levels, (rows, columns), generator=generator).to(dtype)
    else:
        cost = torch.randn(rows, columns, generator=generator).to(dtype)
    cost[3, 5] = cost[4, ::7] = float("nan")
    prices = torch.zeros(columns, dtype=torch.float64) if levels else torch.randn(columns, generator=generator, dtype=torch.float64)
    c, p = cost.numpy(), prices.numpy()
    skip = torch.randint(-1, columns, (rows,), generator=generator).numpy()
    for i in range(rows):
        values = [float(c[i, k]) - float(p[k]) for k in range(columns)]
        finite = [(v, k) for k, v in enumerate(values) if v == v]
        first = max(v for v, _ in finite)
        best = min(k for v, k in finite if v == first)
        second = max(v for v, k in finite if k != best)
        assert lap._top_two(c[i], p.copy()) == (first, second, best)
        others = max(v for v, k in finite if k != skip[i])
        assert lap._row_best(c, p, torch.tensor([i]).numpy(), skip[i : i + 1])[0] == others
    distances = torch.randn(columns, generator=generator, dtype=torch.float64)
    distances[::5] = float("inf")
    assert lap._least(distances.numpy()) == distances.min().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("levels", [2, 5, 1000])  # few distinct values: ties everywhere
def test_tie_heavy_matrices_reach_the_optimum_cold_and_warm(levels: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(levels)
    n = 211
    cost = torch.randint(0, levels, (n, n), generator=generator).to(dtype)
    sigma, warm = solve_lap(cost)
    total = lambda c, s: c.double()[torch.arange(n), s].sum().item()  # noqa: E731
    assert torch.equal(torch.sort(sigma).values, torch.arange(n))
    assert total(cost, sigma) == total(cost, optimum(cost))
    for _ in range(3):
        rows = torch.randperm(n, generator=generator)[: n // 3]
        cost[rows] = torch.randint(0, levels, (len(rows), n), generator=generator).to(dtype)
        sigma, warm = solve_lap(cost, warm)
        assert torch.equal(torch.sort(sigma).values, torch.arange(n))
        assert total(cost, sigma) == total(cost, optimum(cost))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "seed"), [(301, 8), (256, 9)])
def test_a_second_lane_changes_nothing(monkeypatch, n: int, seed: int, dtype: torch.dtype) -> None:
    """With `lanes` (half of each pass over rows on a second thread; SPLIT_FROM lowered so that every pass
    splits) the assignments and warm starts are those of one thread, on near-ties (a low-rank matrix plus noise
    at the float32 rounding scale) cold and warm: the optimum of the dense solver."""
    monkeypatch.setattr(lap, "SPLIT_FROM", 1)
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 3, generator=generator), torch.randn(n, 3, generator=generator)
    warms: list[lap.WarmStart | None] = [None, None]
    with ThreadPoolExecutor(1) as lanes:
        for step in range(4):
            noise = 1e-6 * torch.randn(n, n, generator=generator)
            cost = (a @ b.T + noise).to(dtype)
            (one, warms[0]), (two, warms[1]) = solve_lap(cost, warms[0]), solve_lap(cost, warms[1], lanes=lanes)
            assert torch.equal(one, two) and torch.equal(one, optimum(cost)), step
            assert warms[0] is not None and warms[1] is not None, "fell back to the dense solver"
            for field in ("sigma", "prices", "candidates"):
                x, y = getattr(warms[0], field), getattr(warms[1], field)
                assert (x is None and y is None) or torch.equal(x, y), field
            b += 0.05 * torch.randn(n, 3, generator=generator)


def test_matching_with_a_second_lane_keeps_its_trajectory(monkeypatch) -> None:
    """weight_matching hands its idle pool thread to a LAP solved alone (torch on 2 threads): with every pass
    over rows split (SPLIT_FROM 1) the visits, permutations and objective history are those without a split."""
    from modeconn_fast.rebasin import matching as matching_module

    monkeypatch.setattr(lap, "PATHS_UP_TO", 0)  # the candidates' path, whose passes split
    monkeypatch.setattr(matching_module, "SERIAL_UP_TO", 0)  # torch on 2 threads: the pool is the second lane
    split_calls: list[int] = []
    in_halves = lap._in_halves

    def counted(lanes, kernel, c, p, rows, arg):
        split_calls.append(lanes is not None and len(rows) * c.shape[1] >= lap.SPLIT_FROM)
        return in_halves(lanes, kernel, c, p, rows, arg)

    monkeypatch.setattr(lap, "_in_halves", counted)
    lap_loading.wait()
    torch.manual_seed(11)
    model_a, model_b = mlp((64, 120, 120, 120, 10)), mlp((64, 120, 120, 120, 10))
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for split_from in (10**12, 1):
            monkeypatch.setattr(lap, "SPLIT_FROM", split_from)
            visits: list[tuple[str, torch.Tensor]] = []
            result = weight_matching(model_a, model_b, example_input=torch.randn(2, 64), on_visit=lambda g, p: visits.append((g, p)))
            runs.append((visits, result.objective_history))
    finally:
        torch.set_num_threads(threads)
    (plain, plain_history), (split, split_history) = runs
    assert any(split_calls), "no pass was split"
    assert [g for g, _ in split] == [g for g, _ in plain]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(split, plain))
    assert split_history == plain_history
