"""Exact dense linear assignment, warm-started from the last solve of a similar matrix, with a dual certificate.

maximise Σ_i C[i, σ(i)] over permutations σ. Duals: row values a and column prices p with

    C[i, k] ≤ a_i + p_k for every (i, k),   equality on (i, σ(i)).

Then for every permutation τ, Σ_i C[i, τ(i)] ≤ Σ_i a_i + Σ_k p_k = Σ_i C[i, σ(i)] (LP duality): σ is optimal.
Weight matching solves one such problem per group visit, each a small change of the last one, so:
  1. start from the last visit's σ and p; a dense pass finds the rows whose σ(i) is no longer a best entry
     of C − p; they are freed and given a_i = max_k (C[i, k] − p_k), which keeps the duals feasible;
  2. each free row is assigned by a shortest augmenting path (Dijkstra on the reduced costs a_i + p_k − C[i, k]
     ≥ 0, then a dual update that keeps them ≥ 0 and makes the path tight; the Hungarian method as in
     Jonker & Volgenant 1987) over candidate entries only: per row, its best entries of C − p at the last time
     it was freed, and σ(i);
  3. the check of step 1 runs again on the rows the paths moved and those whose value a_i fell by more than
     its slack (its margin over the row's other columns at its last check; prices only rise, so no other row
     can fail); rows that fail are freed with fresh candidates, until none fails: the certificate.
Only the freed rows cost work beyond one dense pass. A row whose candidates hold no augmenting path stays free
for fresh candidates in the first rounds, later its search runs over whole rows. Cold (prices start at the
column maxima), and where nearly all rows fail the first check (the matrix moved far), if few rows hold the
columns' maxima (hubs, `_column_maxima`: the paths from them would be long), an ε-scaling auction over whole
rows (Bertsekas 1988) first brings the prices close to the final ones; its assignment is only a start, the
checks decide (a warm solve that frees half the rows, typical at 4096 and 8192 units, is faster without it: its
restarts read every row several times; so is a random matrix's cold solve). If the rounds do not settle, the
dense solver (`scipy.optimize.linear_sum_assignment`) answers instead: the result is always an exact optimum.
The passes over whole rows (the checks, the auction's bids, the paths' nearest column) reduce with llvm.maxnum
and llvm.minnum (`_llvm_float64`), which the compiler vectorises.
Up to PATHS_UP_TO units (`_dense_rounds`) the same check and paths run over whole rows, with no candidates and
no auction: the freed rows are first reassigned by Jonker & Volgenant's augmenting row reduction (its reads of
a row served by that row's cached best columns while they still hold its best two), the rest by shortest paths.
Up to 2048 units a row costs so little that candidate lists and the auction's restarts cost more than they save.
"""
from __future__ import annotations

import heapq
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from scipy.optimize import linear_sum_assignment
from torch import Tensor

DENSE_BELOW = 256  # under this size the dense solver is as fast (read at call time: tests lower it)
PATHS_UP_TO = 2048  # up to this size `_dense_rounds` (whole rows, no candidates, no auction) is faster: B4's matchings
# at 2048 units 4-20 % faster than by candidates (the same permutations); at 4096 within 2 %, so candidates from there
CANDIDATES = 32  # best entries of C − p kept per freed row
ROUNDS = 16  # check-and-repair rounds before falling back to the dense solver
AUCTION_ABOVE = 0.9  # fraction of rows failing the first check above which an auction starts afresh (cold: all)
AUCTION_SHARE = 0.35  # ... if fewer rows than this fraction hold some column's maximum (hubs: B4's trained pairs
# at 8192 units 0.08-0.18, a cold solve 2.4 s with the auction and 279 s without; random ones 0.64-0.85, 30 %
# faster without)
EPS_FIRST, EPS_LAST = 1e-2, 1e-4  # the auction: first and last ε, relative to the candidates' spread
SCALING = 8  # ε shrinks by this factor per auction phase
BIDS = 64  # bids per row allowed to one auction phase (each reads a whole row)
# Augmenting row reduction: a row met more than max(ARR_VISITS, n // ARR_UNITS_PER_VISIT) times in one round's
# reduction, its best column owned, is left to the shortest paths (a price war on near-ties: its raises are tiny;
# a path's steps read whole rows, so the larger n the later). Replayed LAPs of B4's matchings 5-16 % faster than
# with a cap on all steps (4n up to 1024 units, 8n above; most warm solves reached it, a few rows taking half of
# the steps); the best limits measured 8-12 at 512 units, 10-16 at 1024, 24-48 at 2048 (8 there: 5-14 % slower
# than the old cap).
ARR_VISITS, ARR_UNITS_PER_VISIT = 8, 64
TOP = 4  # best columns per row cached for the row reduction's reads (`_best_two`)
CHUNK_COLUMNS = 16  # `_row_top`'s chunks (at 512 columns 8 measured slower, 32 within noise)
WHOLE_ROWS_FROM = 2  # earlier rounds leave a row whose candidates hold no path free for fresh ones next round
SPLIT_FROM = 1 << 20  # entries of C read by one pass over rows from which `lanes` takes half of them (`_in_halves`)


@dataclass
class WarmStart:
    """What a solve leaves for the next solve of a similar matrix: the assignment σ (row i → column σ(i)), the
    column prices p certifying it, and each row's candidate columns ([n, CANDIDATES])."""

    sigma: Tensor
    prices: Tensor
    candidates: Tensor | None  # None from `_solve_by_paths`, which keeps none


def solve_lap(
    cost: Tensor, warm: WarmStart | None = None, *, force: bool = False, lanes: Executor | None = None
) -> tuple[Tensor, WarmStart | None]:
    """(σ, warm start): an optimal assignment of `cost` ([n, n], maximised), and what it leaves for the next
    solve (None when the dense solver answered). `warm` only makes it faster. `force`: the certified path also
    under DENSE_BELOW units. A float32 `cost` is read as it is (no float64 copy); duals are float64 either way.
    `lanes`: an idle thread (a LAP solved alone on 2 cores) that takes half of each large pass over whole rows
    (the dual check, the candidates of freed rows; `_in_halves`): the same numbers, in less time. A cost on
    another device is copied to the CPU first; σ is a CPU tensor."""
    cost = cost.cpu()
    n = cost.shape[0]
    c = cost if cost.dtype == torch.float32 else cost.double()
    if n < DENSE_BELOW and not force:
        return _dense(c.numpy()), None
    if n <= PATHS_UP_TO:
        return _solve_by_paths(c, warm)
    return _solve_by_candidates(c.numpy(), warm, lanes)


def _solve_by_candidates(c: np.ndarray, warm: WarmStart | None, lanes: Executor | None) -> tuple[Tensor, WarmStart | None]:
    """`solve_lap` above PATHS_UP_TO units: steps 1-3 of the module's docstring. Between the compiled passes it
    runs numpy, on this thread only: torch's small ops here each opened an OpenMP region, which on 2 busy cores
    waited milliseconds for the second core (most of the solve's time at 2048 units under load)."""
    n = c.shape[0]
    share = None  # the fraction of rows holding some column's maximum (`_column_maxima`), where needed
    if warm is None or warm.candidates is None:
        prices, share = _column_maxima(c)
        candidates = _best_columns(c, np.arange(n), prices, lanes)
        sigma = np.full(n, -1, dtype=np.int64)
    else:
        sigma, prices = warm.sigma.numpy().copy(), warm.prices.double().numpy().copy()
        candidates = warm.candidates.numpy().copy()
    chosen = _gather(c, candidates)
    tolerance = 1e-12 * n * max(float(np.abs(chosen).max()), 1.0)
    spread = float(chosen.max() - chosen.min())
    far = False
    extra: list[np.ndarray] = []  # the candidates before each round of this solve, kept until it ends
    a = np.zeros(n)  # row values; the paths keep them up to date between checks
    slack = np.zeros(n)  # a_i − max_{k ≠ σ(i)} (C[i, k] − p_k) at the check, less a's falls
    check = np.arange(n)  # rows to check: all at first, then those the paths may have made infeasible
    for round_ in range(ROUNDS):
        current = sigma[check]
        others = _in_halves(lanes, _row_best, c, prices, check, current)
        assigned = current >= 0
        matched = np.maximum(current, 0)
        values = np.where(assigned, c[check, matched] - prices[matched], others)
        bad = ~assigned | (others > values + tolerance)
        a[check] = np.where(bad, np.maximum(others, values), values)
        slack[check] = values - others
        if not bad.any():
            result = torch.from_numpy(sigma)
            return result, WarmStart(result, torch.from_numpy(prices - prices.min()), torch.from_numpy(candidates))
        if not far and bad.sum() > AUCTION_ABOVE * n:  # cold, or far from the last matrix: asked once a solve
            far = True
            share = _column_maxima(c)[1] if share is None else share
            if share < AUCTION_SHARE:  # hubs
                sigma.fill(-1)
                _auction(c, sigma, prices, spread * EPS_FIRST, spread * EPS_LAST, BIDS * n)
                check = np.arange(n)
                continue
        free = check[bad]
        extra.append(candidates.copy())
        candidates[free] = _best_columns(c, free, prices, lanes)
        column = np.where(sigma >= 0, sigma, candidates[:, 0])[:, None]
        sigma[free] = -1
        graph = np.concatenate([candidates, column, *extra], axis=1)  # repeats are harmless
        changed = _augment(
            graph, _gather(c, graph), c, free, sigma, a, prices, slack, round_ >= WHOLE_ROWS_FROM
        )
        check = np.flatnonzero(changed)
    return _dense(c), None


def warm_up() -> None:
    """Compile (or load from numba's cache) every compiled function of this module for the argument types that
    `solve_lap` passes: a cold solve and a warm-started one of a small matrix by each of its two paths (whole rows,
    and candidates as above PATHS_UP_TO units), in float64 and float32. `make` runs it at install, so that the
    cache is filled before the first use."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, generator=generator, dtype=torch.float64), torch.randn(4, 64, generator=generator)
    cost = torch.cat([a @ b.double(), a @ b.double().roll(1, 1)], dim=1).repeat(4, 2)
    cost = cost + 1e-3 * torch.rand(cost.shape, generator=generator, dtype=torch.float64)
    moved = cost + 0.1 * cost.roll(1, 0)
    for dtype in (torch.float64, torch.float32):
        _, warm = _solve_by_paths(cost.to(dtype), None)
        _solve_by_paths(moved.to(dtype), warm)
        _, warm = _solve_by_candidates(cost.to(dtype).numpy(), None, None)  # as above PATHS_UP_TO units
        _solve_by_candidates(moved.to(dtype).numpy(), warm, None)


def _best_columns(c: np.ndarray, rows: np.ndarray, prices: np.ndarray, lanes: Executor | None = None) -> np.ndarray:
    """The CANDIDATES best columns of C − p in each of `rows` ([len(rows), CANDIDATES]), in any order."""
    return _in_halves(lanes, _top_columns, c, prices, rows, min(CANDIDATES, c.shape[1]))


def _in_halves(
    lanes: Executor | None, kernel: Callable[..., np.ndarray], c: np.ndarray, p: np.ndarray, rows: np.ndarray,
    arg: np.ndarray | int,
) -> np.ndarray:
    """kernel(c, p, rows, arg): a compiled pass whose output row t depends on row rows[t] of C only (`arg`: one
    entry per row, or a number). With `lanes` and at least SPLIT_FROM entries of C to read, the second half of
    the rows runs on lanes' thread beside the first (the kernels release the GIL), the halves joined: the same
    array. Two plain threads, not a numba parallel loop: that starts a second OpenMP pool, which spins against
    torch's."""
    if lanes is None or len(rows) * c.shape[1] < SPLIT_FROM:
        return kernel(c, p, rows, arg)
    half = len(rows) // 2
    each = isinstance(arg, np.ndarray)
    second = lanes.submit(kernel, c, p, rows[half:], arg[half:] if each else arg)
    first = kernel(c, p, rows[:half], arg[:half] if each else arg)
    return np.concatenate([first, second.result()])


@numba.njit(cache=True, nogil=True)
def _column_maxima(c):  # pragma: no cover - compiled
    """(max_i C[i, k] for each column k, as float64; the fraction of rows that hold some column's maximum, the
    first among equals), in one pass over the rows that the compiler vectorises (numpy's argmax down the columns
    took 1.3 s at 8192 units). Few rows holding the maxima (hubs, as in trained models' first cost matrices)
    make shortest augmenting paths from a cold start long: there an auction first brings the prices close."""
    n, m = c.shape
    maxima = np.empty(m)
    rows = np.zeros(m, dtype=np.int64)
    for k in range(m):
        maxima[k] = c[0, k]
    for i in range(1, n):
        row = c[i]
        for k in range(m):
            if row[k] > maxima[k]:
                maxima[k] = row[k]
                rows[k] = i
    holds = np.zeros(n, dtype=np.bool_)
    for k in range(m):
        holds[rows[k]] = True
    return maxima, holds.sum() / n


@numba.njit(cache=True, nogil=True)
def _gather(c, cols):  # pragma: no cover - compiled
    """C[i, cols[i, e]] for every (i, e) (numpy's take_along_axis, which took 4 ms for [2048, 100] here)."""
    out = np.empty(cols.shape, dtype=c.dtype)
    for i in range(cols.shape[0]):
        for e in range(cols.shape[1]):
            out[i, e] = c[i, cols[i, e]]
    return out


@numba.njit(cache=True, nogil=True)
def _top_columns(c, p, rows, k):  # pragma: no cover - compiled
    """For each i in rows, the k columns of the largest C[i, col] − p_col (`_row_top`), no temporary beyond
    [len(rows), k] and one row's scratch."""
    out = np.empty((rows.shape[0], k), dtype=np.int64)
    values, (maxima, picked) = np.empty(k), _row_top_scratch(c.shape[1])
    for t in range(rows.shape[0]):
        _row_top(c, p, rows[t], values, out[t], maxima, picked)
    return out


@numba.njit(cache=True)
def _row_top_scratch(n):  # pragma: no cover - compiled
    """`_row_top`'s scratch for rows of n columns: (maxima: one float per chunk, picked: one int per column)."""
    return np.empty(n // CHUNK_COLUMNS), np.empty(n, dtype=np.int64)


@numba.njit(cache=True)
def _row_top(c, p, i, values, index, maxima, picked):  # pragma: no cover - compiled
    """The len(values) = k largest C[i, col] − p_col of row i into values (a min-heap: values[0] the least of them)
    and their columns into index. `maxima` and `picked` are scratch (`_row_top_scratch`). The
    maxima of the row's chunks of CHUNK_COLUMNS columns (a loop of fixed length, which the compiler vectorises)
    give a threshold τ, their k-th largest: at least k entries reach it, so the k largest all do, and only in the
    chunks whose maximum reaches τ (typically k of them) or the last n mod CHUNK_COLUMNS columns; their columns
    reaching τ are listed without a branch, then pass through the heap in column order (a column enters above the
    heap's least). At 512 columns 2× faster than a threshold from 1.5k segments of variable length (whose loops the
    compiler did not vectorise) and a listing pass over the whole row; that was 1.3-1.8× faster than one pass
    through the heap, whose k·ln(n/k) insertions each mispredict a branch. Rows of fewer than k chunks, or where
    fewer than k entries reach τ (NaN): every column through the heap, where a NaN entry may stay among the k
    (costs holding NaN end in the paths' ValueError; weight matching refuses non-finite weights first)."""
    k = values.shape[0]
    row = c[i]
    n = row.shape[0]
    chunks = n // CHUNK_COLUMNS
    count = 0
    if chunks >= k:
        for g in range(chunks):
            m, start = -np.inf, g * CHUNK_COLUMNS
            for t in range(CHUNK_COLUMNS):
                m = _max_num(m, row[start + t] - p[start + t])
            maxima[g] = m
        for e in range(k):  # τ: the least of a min-heap of the k largest maxima (`picked` as its unused index)
            values[e] = maxima[e]
        for start in range(k // 2 - 1, -1, -1):
            _sift_down(values, picked, start, k)
        for g in range(k, chunks):
            if maxima[g] > values[0]:
                values[0] = maxima[g]
                _sift_down(values, picked, 0, k)
        tau = values[0]
        for g in range(chunks):
            if maxima[g] >= tau:
                for col in range(g * CHUNK_COLUMNS, (g + 1) * CHUNK_COLUMNS):
                    picked[count] = col
                    count += row[col] - p[col] >= tau
        for col in range(chunks * CHUNK_COLUMNS, n):  # the last columns, fewer than a chunk
            picked[count] = col
            count += row[col] - p[col] >= tau
    if count < k:
        count = n
        for col in range(n):
            picked[col] = col
    for e in range(k):
        values[e] = row[picked[e]] - p[picked[e]]
        index[e] = picked[e]
    for start in range(k // 2 - 1, -1, -1):
        _sift_down(values, index, start, k)
    for t in range(k, count):
        col = picked[t]
        v = row[col] - p[col]
        if v > values[0]:
            values[0] = v
            index[0] = col
            _sift_down(values, index, 0, k)


@numba.njit(cache=True)
def _sift_down(values, index, at, size):  # pragma: no cover - compiled
    """Restore the min-heap order of values[:size] (and the parallel `index`) below position `at`."""
    while True:
        least, left = at, 2 * at + 1
        if left < size and values[left] < values[least]:
            least = left
        if left + 1 < size and values[left + 1] < values[least]:
            least = left + 1
        if least == at:
            return
        values[at], values[least] = values[least], values[at]
        index[at], index[least] = index[least], index[at]
        at = least


def _dense(c: np.ndarray) -> Tensor:
    return torch.as_tensor(linear_sum_assignment(c, maximize=True)[1], dtype=torch.long)


@numba.njit(cache=True, nogil=True)
def _row_best(c, p, rows, skip):  # pragma: no cover - compiled
    """max_{k ≠ skip[t]} (C[i, k] − p_k) for each i = rows[t] (skip[t] < 0: over every column): one read of
    those rows, no n×n temporary. Column skip[t] is left out by a price of +∞ in a copy of p (the callers' p is
    shared between threads), so each row is one pass over all columns: two passes around it took 1.9× as long
    at 8192 units. Serial: a parallel loop starts numba's own OpenMP threads, which spin against torch's and made
    every torch call after it several times slower on 2 cores."""
    best = np.empty(rows.shape[0])
    q = p.copy()
    for t in range(rows.shape[0]):
        i, j = rows[t], skip[t]
        if j >= 0:
            q[j] = np.inf
        best[t] = _range_max(c[i], q, 0, c.shape[1])
        if j >= 0:
            q[j] = p[j]
    return best


@numba.njit(cache=True, inline="always")
def _range_max(row, p, start, stop):  # pragma: no cover - compiled
    """max_{start ≤ k < stop} (row[k] − p_k) (−∞ if empty; NaN entries skipped), one `_max_num` per entry: the
    compiler vectorises the loop (2.2× faster over a float32 row of 8192, 5× over a float64 row of 512 in cache
    than four running maxima of `v if v > m else m`, which it did not vectorise)."""
    m = -np.inf
    for k in range(start, stop):
        m = _max_num(m, row[k] - p[k])
    return m


@numba.njit(cache=True, inline="always")
def _row_scan(row, p):  # pragma: no cover - compiled
    """(max_k (row[k] − p_k), max_k |row[k]|) in one vectorised pass (NaN entries skipped, as `_range_max`)."""
    m, largest = -np.inf, 0.0
    for k in range(row.shape[0]):
        m = _max_num(m, row[k] - p[k])
        largest = _max_num(largest, abs(row[k]))
    return m, largest


def _llvm_float64(name: str):  # type: ignore[no-untyped-def]
    """A compiled function of two float64s that is the LLVM intrinsic `name`. Numba writes max and min as a
    comparison and a select, a reduction LLVM does not vectorise without fast-math flags (which would also let it
    assume no NaN); over llvm.maxnum and llvm.minnum, which skip a NaN operand, it does, with no flag."""

    @intrinsic
    def call(typingctx, a, b):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            double = ir.DoubleType()
            function = builder.module.declare_intrinsic(name, [double], ir.FunctionType(double, [double, double]))
            return builder.call(function, args)

        return types.float64(types.float64, types.float64), codegen

    return call


_max_num = _llvm_float64("llvm.maxnum")  # max(a, b), the other where one is NaN
_min_num = _llvm_float64("llvm.minnum")  # min(a, b), the other where one is NaN


@numba.njit(cache=True, nogil=True)
def _auction(c, row_to_col, p, eps, eps_end, budget):  # pragma: no cover - compiled
    """An assignment and prices near the optimum's: the auction algorithm with ε-scaling (Bertsekas 1988) over
    whole rows. A free row bids for the column of its best value C[i, k] − p_k, raising the price to leave it
    ε short of indifferent to its second best; the previous owner is freed and bids in turn. Each phase ends
    with every row assigned within ε of its best; ε shrinks by SCALING per phase down to eps_end. Stops early
    after `budget` bids in one phase."""
    n = c.shape[0]
    col_to_row = np.full(n, -1, dtype=np.int64)
    queue = np.empty(n + budget, dtype=np.int64)
    while True:
        row_to_col[:] = -1
        col_to_row[:] = -1
        queue[:n] = np.arange(n)
        head, tail = 0, n
        while head < tail:
            if head >= budget:
                return
            i = queue[head]
            head += 1
            first, second, best = _top_two(c[i], p)
            p[best] += (first - second if second > -np.inf else 0.0) + eps
            owner = col_to_row[best]
            if owner >= 0:
                row_to_col[owner] = -1
                queue[tail] = owner
                tail += 1
            row_to_col[i] = best
            col_to_row[best] = i
        if eps <= eps_end:
            return
        eps = max(eps / SCALING, eps_end)


@numba.njit(cache=True, inline="always")
def _top_two(row, p):  # pragma: no cover - compiled
    """(first, second, column of first): the largest row[k] − p_k, the lowest column holding it, and the largest
    over the other columns. Two passes that the compiler vectorises (the maximum; the maximum with its column's
    price at +∞ for a moment) around a scan for that column: 1.4× faster over rows of 8192 than one pass of
    branches. A row of NaN only: (−∞, −∞, its last column)."""
    n = row.shape[0]
    first = _range_max(row, p, 0, n)
    best = 0
    while best < n - 1 and row[best] - p[best] != first:
        best += 1
    price = p[best]
    p[best] = np.inf
    second = _range_max(row, p, 0, n)
    p[best] = price
    return first, second, best


@numba.njit(cache=True, nogil=True)
def _augment(cols, values, c, free_rows, row_to_col, a, p, slack, whole_rows):  # pragma: no cover - compiled
    """Assign every free row by a shortest augmenting path over the candidate entries (cols[i, e], value
    values[i, e], gathered once: searches read them many times, and reading C in place measured 1.5x slower at
    4096); where the candidates hold no path, all of row i of c if `whole_rows`, else the row stays free.
    Updates the assignment row_to_col (−1: free) and the duals a (rows), p (columns) in place. Returns the rows
    that may now break C[i, k] ≤ a_i + p_k: the free rows and those the paths moved, and those whose value fell
    by more than their slack (the margin of σ(i) over the row's other columns at its last check): for every
    other row the price rises (the only other change) cannot break it."""
    n = c.shape[0]
    col_to_row = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        if row_to_col[i] >= 0:
            col_to_row[row_to_col[i]] = i
    changed = np.zeros(n, dtype=np.bool_)
    dist = np.full(n, np.inf)
    done = np.zeros(n, dtype=np.bool_)
    pred = np.full(n, -1, dtype=np.int64)  # the row before column k on the shortest path
    scanned = np.empty(n, dtype=np.int64)
    touched = np.empty(n, dtype=np.int64)  # the columns a search gave a distance: only these are reset after it
    for s in free_rows:
        search = (cols, values, c, col_to_row, a, p, dist, done, pred, scanned, touched)
        sink, length, n_scanned, n_touched = _shortest_path(s, False, *search)
        if sink < 0:
            changed[s] = True
            _reset(dist, done, touched, n_touched)
            if not whole_rows:
                continue
            sink, length, n_scanned, n_touched = _shortest_path(s, True, *search)
            if sink < 0:
                raise ValueError("no augmenting path over whole rows: the cost matrix holds NaN or infinite entries")
        for t in range(n_scanned):  # p_k += D − d_k on the scanned columns, the matched rows follow
            k = scanned[t]
            delta = length - dist[k]
            p[k] += delta
            i = col_to_row[k]
            if i >= 0:
                a[i] -= delta
                slack[i] -= delta
                if slack[i] < 0.0:
                    changed[i] = True
        a[s] -= length
        changed[s] = True
        j = sink
        while pred[j] != s:  # the rows the path moves: their slack is unknown
            changed[pred[j]] = True
            j = row_to_col[pred[j]]
        _flip_path(s, sink, pred, row_to_col, col_to_row)
        _reset(dist, done, touched, n_touched)
    return changed


@numba.njit(cache=True)
def _reset(dist, done, touched, n_touched):  # pragma: no cover - compiled
    """dist = ∞ and done = False again on the touched columns (O(columns touched), not O(n) per search)."""
    for t in range(n_touched):
        dist[touched[t]] = np.inf
        done[touched[t]] = False


@numba.njit(cache=True)
def _flip_path(s, sink, pred, row_to_col, col_to_row):  # pragma: no cover - compiled
    """Augment along the shortest path from free row s to free column `sink` (pred[k]: the row before column k):
    each row on it takes the column after it."""
    j = sink
    while True:
        i = pred[j]
        nxt = row_to_col[i]
        row_to_col[i] = j
        col_to_row[j] = i
        if i == s:
            return
        j = nxt


@numba.njit(cache=True)
def _shortest_path(s, dense, cols, values, c, col_to_row, a, p, dist, done, pred, scanned, touched):  # pragma: no cover
    """Dijkstra from free row s over the columns, reduced costs a_i + p_k − C[i, k]: (sink, its distance,
    number of scanned columns, listed in `scanned`, number of columns given a distance, listed in `touched`);
    sink −1 when no free column is reachable. Expects dist = ∞ and done = False everywhere (`_reset` after).
    Over candidate entries the next column comes from a heap, over whole rows from a scan of the distances
    (O(n) memory; the same column: the nearest, the lowest index among equals). A column reached beyond the
    nearest free column found so far is neither recorded nor pushed: it cannot be scanned before that column
    (the same path and duals; warm 8192 solves 24 % faster, fewer heap entries)."""
    n_touched = 0
    heap = [(0.0, np.int64(0))]
    heap.pop()
    n_scanned = 0
    width = c.shape[1] if dense else cols.shape[1]
    i, d = s, 0.0
    bound = np.inf  # the nearest free column's distance so far: a column beyond it is never scanned before it
    while True:
        for e in range(width):  # relax the edges of row i, reached at distance d
            k = e if dense else cols[i, e]
            if done[k]:
                continue
            nd = d + a[i] + p[k] - (c[i, k] if dense else values[i, e])
            if nd < dist[k] and nd <= bound:
                if col_to_row[k] < 0:
                    bound = nd
                if dist[k] == np.inf:
                    touched[n_touched] = k
                    n_touched += 1
                dist[k] = nd
                pred[k] = i
                if not dense:
                    heapq.heappush(heap, (nd, k))
        j = -1
        if dense:  # a scan for the nearest column: a heap would grow to n entries per scanned row (GBs at 8192)
            for k in range(width):
                if not done[k] and dist[k] < np.inf and (j < 0 or dist[k] < dist[j]):
                    j = k
            if j >= 0:
                d = dist[j]
        while j < 0 and heap:
            d, k = heapq.heappop(heap)
            if not done[k] and d <= dist[k]:
                j = k
        if j < 0:
            return -1, 0.0, n_scanned, n_touched
        done[j] = True
        scanned[n_scanned] = j
        n_scanned += 1
        if col_to_row[j] < 0:
            return j, d, n_scanned, n_touched
        i = col_to_row[j]




def _solve_by_paths(c: Tensor, warm: WarmStart | None) -> tuple[Tensor, WarmStart | None]:
    """`solve_lap` up to PATHS_UP_TO units: `_dense_rounds` from the last solve's σ and p (cold: p = column maxima,
    every row free); scipy's dense solver if its rounds do not settle."""
    n = c.shape[0]
    if warm is None:
        sigma, prices = np.full(n, -1, dtype=np.int64), c.amax(dim=0).double().numpy()
    else:  # numpy copies of n entries: a few microseconds each, against ~5 for a torch op
        sigma, prices = warm.sigma.numpy().copy(), warm.prices.numpy().astype(np.float64)
    if _dense_rounds(c.numpy(), sigma, prices, ROUNDS):
        assignment = torch.from_numpy(sigma)
        return assignment, WarmStart(assignment, torch.from_numpy(prices - prices.min()), None)
    return _dense(c.numpy()), None


@numba.njit(cache=True)
def _best_two(c, p, i, top, bound, values, index, maxima, picked):  # pragma: no cover - compiled
    """(first, second, column of first): the two largest C[i, k] − p_k of row i, the lowest column among equals.

    Read from row i's cached best columns top[i] (fewer than n) while they hold its best two: within one solve
    prices only rise, so a column outside the cache stays at or below bound[i], its value when the cache was
    filled; a second above it is exact. Else the row is read whole and top[i], bound[i] filled anew (values,
    index: a heap of len(top[i]) + 1 entries; maxima, picked: `_row_top`'s scratch). Row reduction meets the same
    rows again and again (price wars on near-ties): most reads are of the cache."""
    first, second, best = -np.inf, -np.inf, -1
    if bound[i] > -np.inf:
        for e in range(top.shape[1]):
            k = top[i, e]
            v = c[i, k] - p[k]
            if v > first or (v == first and k < best):
                second = first
                first, best = v, k
            elif v > second:
                second = v
        if second > bound[i]:
            return first, second, best
        first, second, best = -np.inf, -np.inf, -1
    _row_top(c, p, i, values, index, maxima, picked)
    bound[i] = values[0]
    for e in range(values.shape[0]):
        k = index[e]
        if e > 0:
            top[i, e - 1] = k
        v = values[e]
        if v > first or (v == first and k < best):
            second = first
            first, best = v, k
        elif v > second:
            second = v
    return first, second, best


@numba.njit(cache=True, nogil=True)
def _dense_rounds(c, row_to_col, p, rounds):  # pragma: no cover - compiled
    """Jonker & Volgenant (1987) from a warm start, over whole rows; True once the dual check certifies the
    assignment row_to_col (updated in place with the prices p) within the tolerance 1e-12·n·max(max |C|, 1)
    (found by the first round's check in the same pass over C, `_row_scan`), False after `rounds` rounds.
    A round: (1) the dense check: a_i = max_k (C[i, k] − p_k); a row whose σ(i) is more than `tolerance` below
    is freed (so a, p stay feasible: C[i, k] ≤ a_i + p_k); none freed: done. It reads every row in the first
    round, later only the rows the last round reassigned or whose column's price it raised: for any other row
    C[i, σ(i)] − p_σ(i) is the same number and every other C[i, k] − p_k can only have fallen (prices only rise),
    so it passes again. (2) Augmenting row reduction: a free row takes its best column, the price of which rises
    to leave it indifferent to its second best (prices only rise, so every row stays feasible), freeing the
    owner, who goes next; a row whose best column is owned, and tied with its second or met more than `visits`
    times in this reduction (price wars; at most (visits + 1)·n steps), waits for (3): a shortest augmenting path
    (Dijkstra over the reduced costs a_i + p_k − C[i, k] ≥ 0, `_dense_path`), then p_k += D − d_k on the scanned
    columns, which keeps them ≥ 0 and makes the path tight."""
    n = c.shape[0]
    visits = max(ARR_VISITS, n // ARR_UNITS_PER_VISIT)
    a = np.empty(n)
    col_to_row = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        if row_to_col[i] >= 0:
            col_to_row[row_to_col[i]] = i
    free = np.empty(n, dtype=np.int64)
    dist = np.full(n, np.inf)  # a search's distances, ∞ on scanned and unreached columns
    blocked = np.zeros(n)  # +∞ on the columns a search has scanned, 0 elsewhere (`_relax`)
    pred = np.full(n, -1, dtype=np.int64)
    scanned = np.empty(n, dtype=np.int64)  # a search's scanned columns in order, their distances alongside
    scanned_d = np.empty(n)
    top = np.empty((n, min(TOP, n - 1)), dtype=np.int64)  # each row's best columns for `_best_two`
    bound = np.full(n, -np.inf)  # −inf: no cache yet
    values, index = np.empty(top.shape[1] + 1), np.empty(top.shape[1] + 1, dtype=np.int64)
    maxima, picked = _row_top_scratch(c.shape[1])
    touched = np.ones(n, dtype=np.bool_)  # rows to check: all at first, then those the round reassigned or repriced
    met = np.zeros(n, dtype=np.int64)  # times each row was met by this round's row reduction
    largest = 1.0
    for i in range(n):  # the first round's row maxima of C − p, and the largest |C| for the tolerance
        a[i], row_largest = _row_scan(c[i], p)
        largest = _max_num(largest, row_largest)
    tolerance = 1e-12 * n * largest
    for round_ in range(rounds):
        n_free = 0
        for i in range(n):
            if not touched[i]:
                continue
            touched[i] = False
            j = row_to_col[i]
            best = a[i] if round_ == 0 else _range_max(c[i], p, 0, n)
            if j >= 0 and c[i, j] - p[j] >= best - tolerance:
                a[i] = c[i, j] - p[j]
                continue
            a[i] = best
            if j >= 0:
                col_to_row[j] = -1
                row_to_col[i] = -1
            free[n_free] = i
            n_free += 1
        if n_free == 0:
            return True
        # augmenting row reduction (Jonker & Volgenant 1987): a free row takes its best column, whose price rises
        # to leave it indifferent to its second best; the previous owner is freed. Prices only rise: feasible.
        head, kept = 0, 0
        met[:] = 0
        while head < n_free:
            i = free[head]
            head += 1
            touched[i] = True
            first, second, j = _best_two(c, p, i, top, bound, values, index, maxima, picked)
            owner = col_to_row[j]
            met[i] += 1
            if owner >= 0 and (met[i] > visits or first - second <= tolerance):
                a[i] = first
                free[kept] = i
                kept += 1
                continue
            p[j] += first - second if second > -np.inf else 0.0
            a[i] = second
            row_to_col[i] = j
            col_to_row[j] = i
            if owner >= 0:
                row_to_col[owner] = -1
                head -= 1
                free[head] = owner
        for t in range(kept):
            s = free[t]
            first, _, _ = _best_two(c, p, s, top, bound, values, index, maxima, picked)
            a[s] = first
            j, d, n_scanned = _dense_path(c, s, a, p, dist, blocked, pred, col_to_row, scanned, scanned_d)
            for u in range(n_scanned):  # p_k += D − d_k on the scanned columns, the matched rows follow
                k = scanned[u]
                blocked[k] = 0.0
                delta = d - scanned_d[u]
                p[k] += delta
                if col_to_row[k] >= 0:
                    a[col_to_row[k]] -= delta
                    touched[col_to_row[k]] = True
            dist[:] = np.inf  # for the next search
            a[s] -= d
            _flip_path(s, j, pred, row_to_col, col_to_row)
    return False


@numba.njit(cache=True, nogil=True)
def _dense_path(c, s, a, p, dist, blocked, pred, col_to_row, scanned, scanned_d):  # pragma: no cover - compiled
    """Dijkstra from free row s over whole rows, reduced costs a_i + p_k − C[i, k]: (sink, its distance D, number
    of scanned columns), the scanned columns in order in `scanned`, their distances in `scanned_d`, the row before
    each reached column in `pred`. Expects dist = ∞ and blocked = 0 everywhere; leaves ∞ on the scanned columns
    of both. Each step relaxes the whole row (`_relax`) and takes the nearest unscanned column, the lowest index
    among equals: two passes over contiguous arrays, which the compiler vectorises, where a list of the
    unscanned columns read C through a gather (10-16 % slower solves at 512 units, the same assignments)."""
    i, d, n_scanned = s, 0.0, 0
    while True:
        _relax(c[i], d + a[i], p, blocked, dist, pred, i)
        d = _least(dist)
        if d == np.inf:
            raise ValueError("no augmenting path: the cost matrix holds NaN or infinite entries")
        j = 0
        while dist[j] != d:
            j += 1
        dist[j] = blocked[j] = np.inf
        scanned[n_scanned] = j
        scanned_d[n_scanned] = d
        n_scanned += 1
        if col_to_row[j] < 0:
            return j, d, n_scanned
        i = col_to_row[j]


@numba.njit(cache=True, nogil=True)
def _relax(row, base, p, blocked, dist, pred, i):  # pragma: no cover - compiled
    """dist_k = min(dist_k, base + p_k − row_k) and pred_k = i where it falls, on the columns not blocked (+∞ added
    to a blocked column's distance never falls; 0 added leaves a number as it is)."""
    for k in range(row.shape[0]):
        nd = base + p[k] - row[k] + blocked[k]
        if nd < dist[k]:
            dist[k] = nd
            pred[k] = i


@numba.njit(cache=True, nogil=True)
def _least(dist):  # pragma: no cover - compiled
    """min_k dist_k, one `_min_num` per entry (vectorised, as `_range_max`)."""
    m = np.inf
    for k in range(dist.shape[0]):
        m = _min_num(m, dist[k])
    return m
