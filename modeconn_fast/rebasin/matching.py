"""Weight matching (Ainsworth et al. 2023, Alg. 1), made fast without changing its trajectory.

The algorithm: maximise J(π) = Σ_ℓ ⟨W_A^ℓ, π(W_B^ℓ)⟩ by coordinate ascent. Visiting group p with the others
fixed, J is linear in π_p: J = Σ_i C_p[i, π_p(i)] + const with the cost matrix

    C_p = Σ_{(W, a) ∈ p} mat_a(W_A) · mat_a(π_{−a}(W_B))ᵀ,

so the best π_p is one linear assignment problem (LAP). Groups are visited in a random order each sweep; the
search stops after a sweep without gain. Here the same sweeps run with four savings, none of which changes a
step's result:
  1. a group none of whose neighbours changed since it was last solved is skipped (its LAP would return the
     same permutation);
  2. C_p is kept across visits and updated, term by term, only for the units of the neighbouring groups that
     moved: ΔC = mat(A)[:, K] · (mat(B)[:, π_new(K)] − mat(B)[:, π_old(K)])ᵀ, a rank-|K| product instead of
     the full one. The cache is float32 for groups of up to FLOAT32_UP_TO units and from FLOAT32_FROM, each
     update one float32 product accumulated in place at the GEMM rate (the port's products are float32 too; at
     8192 units 256 MB a group instead of 512 MB; at 512-1024 units B4's MLP matchings 8-16 % faster than
     through float64), float64 in between (each float32 product widened and added: a float32 cache took B4's
     VGG pair at 2048 channels off the port's trajectory, to another objective); float64 models keep float64;
  3. the LAP is warm-started from the group's last solve (assignment, dual prices, candidate entries; see
     `lap.py`): only the rows whose assignment a dense dual check rejects are re-solved, by shortest augmenting
     paths, and the same check certifies the exact optimum. A process's first call does not wait for the
     compiled solver to load (`lap_loading.py`): scipy's solves its small LAPs, and the load starts as it ends;
  4. with more than one torch thread, the LAP of the next group due is solved on a second thread beside the
     current one where the current solve cannot change its cost (not a neighbour, nothing solved in between;
     `_solvable_alongside`); the results are taken in the serial order. Where no such pair exists, the next
     group due updates its leading cost terms that the current solve cannot change on the idle core meanwhile
     (`_updated_ahead`: the same additions in the same order, only earlier), and the cost updates of a group of
     more than CHUNK units, or of at least 2·LANE_ROWS units and rank LANE_RANK, run in two lanes
     (`_in_two_lanes`), blocks of rows shared between two threads. Groups up to SERIAL_UP_TO units run torch
     on one thread (`_one_torch_thread`).
Attention heads (spec.Heads): the tied q/k and v groups of one attention module are visited together and
solved exactly by `solve_heads` (a d×d LAP per pair of heads and group, then one LAP over the heads).
The objective history: J before the first sweep and at the end are computed directly (float64), both at the
end, with more than one torch thread on two threads (the weights are screened for NaN and ±∞ first, by a dot
product per tensor); in between J moves by the LAP gains, exact for a linear step up to the cache's rounding
(float32 caches: ~1e-7 relative; float64: ~1e-12).
"""
from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .. import ops_torch
from ..memory import keep_freed_memory
from . import lap_loading
from .derive import permutation_spec
from .permutation import Permutation
from .sources import ModelSource, objective_tensors, read_source
from .spec import Axis, PermutationSpec, SpecError, as_args, axis_index, check_same_architecture, check_same_states

if TYPE_CHECKING:
    from .lap import WarmStart


FLOAT32_UP_TO, FLOAT32_FROM = 1024, 4096  # groups of up to / from this many units keep C_p in float32 (updates
# at the fp32 rate, in place; half the memory), float64 in between (see the module's docstring)
CHUNK = 2048  # rows of the float32 temporaries of a larger update (units for the gathers, rows of C for products);
# at 8192 units 2048 rows measured 2-7% faster than 1024 on replayed mid-rank updates (large ranks: within noise), the same numbers
SERIAL_UP_TO = 1024  # groups up to this many units: the sweeps' torch ops on one thread (see `_one_torch_thread`)
LANE_ROWS = 256  # groups of 2·LANE_ROWS to SERIAL_UP_TO units: their updates in two lanes of blocks of this many rows
LANE_RANK = 128  # ... if of rank |K|·r ≥ this: with float32 caches, against 512, B4's pairs at 512-1024 units 4-7 %
# faster by quartiles over 60-80 calls alternating in one process (64: the same as 128, 256: half the gain)
LINES = 64  # lines of B read at once by a column gather of moved units (`_Term.moved`): kept in cache,
BLOCK_ENTRIES = 1 << 16  # or more lines where they hold up to this many entries at the moved units (fewer ops)
GATHER_TWICE_UP_TO = 1 << 20  # entries of B (4 MiB of float32, in cache) up to which its columns are gathered at
# the new and the old places directly: at 512-1024 units 1.6-2× faster than one read in order; at 2048, 0.8-1.5×
COPY_UP_TO = 1 << 24  # entries: a term's strided rows up to this size are copied contiguous (`_local`)
REUSED_FROM = 1 << 20  # entries (4 MiB of float32): the updates' temporaries from this size are kept for reuse
# (`_Reused`); blocks just under glibc's 32 MiB mmap threshold faulted afresh too (a lane thread's arena trims them)
OBJECTIVE_CHUNK = 1 << 18  # entries widened to float64 at once by `matching_objective` where numpy cannot read
# the tensors (another device or dtype): 2 MB a side, 1/4 fewer seconds than 1 << 16 on a 2.4M-entry weight
_NUMPY_SUMS = (torch.float32, torch.float64)  # dtypes that `matching_objective` sums with numpy's einsum


def _numpy_reads(a: Tensor, b: Tensor) -> bool:
    """Whether numpy can read `a` and `b` as they are (CPU, one dtype of _NUMPY_SUMS): the objective's sums and the
    weights' screen for NaN and ±∞ run there."""
    return a.device.type == b.device.type == "cpu" and a.dtype == b.dtype and a.dtype in _NUMPY_SUMS


@lru_cache(maxsize=4096)
def sweep_order(num_groups: int, seed: int, sweep: int) -> tuple[int, ...]:
    """The random group order of one sweep (shared with the B4 reference port so both walk one trajectory);
    remembered, as every call draws the same orders."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sweep)
    return tuple(torch.randperm(num_groups, generator=generator).tolist())


class _Reused:
    """Storage for the cost updates' large temporaries (B's moved rows, A's gathered rows), kept per purpose and
    thread for one matching: glibc serves blocks above 32 MiB (`memory.KEEP_MMAP`, the most it allows) with fresh
    pages each time, and so does a lane thread's arena with blocks near that size; at 8192 units a rank-4096
    update's temporaries (384 MB) faulted ~100k pages, 0.2-0.5 s of system time (a 128 MB gather took 12 ms into
    kept storage, 85-585 ms into fresh pages; a 32 MB block of A's rows 5 ms against 110-190). Smaller ones come
    from the heap as before, but for those asked `always` (the float64 caches' product rows, `_product_rows`)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, int, torch.dtype, torch.device], Tensor] = {}

    def empty(self, purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              always: bool = False) -> Tensor:
        """An uninitialised tensor of `shape`: from this thread's kept storage for `purpose` (grown as needed) where
        it holds REUSED_FROM entries or more, or `always`, on the CPU; valid until this thread's next one of
        `purpose`."""
        numel = math.prod(shape)
        if (numel < REUSED_FROM and not always) or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (purpose, threading.get_ident(), dtype, device)
        if key not in self.kept or self.kept[key].numel() < numel:
            self.kept.pop(key, None)  # freed before the larger one is made
            self.kept[key] = torch.empty(numel, dtype=dtype, device=device)
        return self.kept[key][:numel].view(shape)


@dataclass
class _Term:
    """One (tensor, axis) of group p whose tensor has one other permuted axis, of group `other` (n_q units).

    `a`, `b` are model A's and B's tensor as [n_q, r, n] (`_other_major`), views of the tensors as given where
    the strides allow (no copy is held: at width 8192 the copies cost more memory than the cache), but for
    strided rows of up to COPY_UP_TO entries (`_local`); `rows` gathers units K of `other` from them. `seen` is
    the permutation of `other` that the cached C_p includes."""

    other: str
    a: Tensor
    b: Tensor
    seen: Tensor | None = None

    def rank(self, units: Tensor | None) -> int:
        """The rank that decides how the update for the moved `units` of `other` runs: |K|·r (None, the first
        visit: n_q)."""
        return self.a.shape[0] if units is None else len(units) * self.a.shape[1]

    @staticmethod
    def rows(w: Tensor, units: Tensor | None, reused: _Reused, purpose: str) -> Tensor:
        """The rows of `w` (self.a or self.b, or a slice of its last axis) at the given units of `other`:
        [len(units)·r, n]. Gathered where the reads stay local: contiguous rows, or, where `other`'s units lie
        closer together in memory than this group's (`other` a linear or convolution weight's input axis), the
        transpose of a contiguous [n, len(units)·r] gather; into `reused` storage for `purpose` where large.
        `units` None: every unit in order, in that layout, a view of `w` where its strides allow (no copy)."""
        if units is not None:
            units = units.to(w.device)
        if w.stride(0) < w.stride(-1):
            lines = w.movedim(-1, 0)
            if units is not None:
                into = reused.empty(purpose, (lines.shape[0], len(units), *lines.shape[2:]), w.dtype, w.device)
                lines = torch.index_select(lines, 1, units, out=into)
            return _widened(lines.reshape(w.shape[-1], -1)).contiguous().T
        if units is None:
            return _widened(w.reshape(-1, w.shape[-1])).contiguous()
        into = reused.empty(purpose, (len(units), *w.shape[1:]), w.dtype, w.device)
        return _widened(torch.index_select(w, 0, units, out=into).reshape(-1, w.shape[-1]))

    def moved(self, units: Tensor | None, now: Tensor, reused: _Reused) -> Tensor:
        """B's rows at the given units' new places minus those at their old ones (`seen`): [len(units)·r, n].

        Where B's rows are gathered as columns (`rows`), the moved units' new places are their old places
        reordered (the permutations agree elsewhere), so each block of B's n lines is read once at those places
        in increasing order and the two orders are picked in cache: 2-3× faster than two gathers in the
        permutations' order at 4096 units, and the same numbers; up to GATHER_TWICE_UP_TO entries B stays in
        cache, and the two gathers are faster. Else the rows are gathered, and the old ones subtracted
        CHUNK units at a time (no third [|K|·r, n] temporary). Large results and temporaries in `reused` storage.
        Before the first update (`seen` and `units` None): B's rows at `now`."""
        if self.seen is None or units is None:
            return self.rows(self.b, None if torch.equal(now, torch.arange(len(now))) else now, reused, "moved")
        new, old = now[units], self.seen[units]
        w = self.b
        if w.stride(0) < w.stride(-1):
            lines = w.movedim(-1, 0)  # [n, n_q, r]: B's lines, units of `other` along each
            if w.numel() <= GATHER_TWICE_UP_TO:
                out = _widened(lines.index_select(1, new.to(w.device)))
                out.sub_(_widened(lines.index_select(1, old.to(w.device))))
                return out.reshape(lines.shape[0], -1).T
            places, order = torch.sort(new)
            at_new = torch.empty_like(order)
            at_new[order] = torch.arange(len(order))
            at_old = torch.searchsorted(places, old)
            places, at_new, at_old = (index.to(w.device) for index in (places, at_new, at_old))
            out = reused.empty("moved", (lines.shape[0], len(units), lines.shape[2]), _WIDER.get(w.dtype, w.dtype), w.device)
            step = max(LINES, BLOCK_ENTRIES // out[0].numel())
            for start in range(0, lines.shape[0], step):
                block = _widened(lines[start : start + step].index_select(1, places))
                torch.sub(block.index_select(1, at_new), block.index_select(1, at_old), out=out[start : start + step])
            return out.reshape(lines.shape[0], -1).T
        b = self.rows(w, new, reused, "moved")
        r = b.shape[0] // len(units)
        for start in range(0, len(units), CHUNK):
            before = self.rows(w, old[start : start + CHUNK], reused, "before")
            b[start * r : start * r + before.shape[0]] -= before
        return b


def _local(w: Tensor) -> Tensor:
    """`w` ([n_q, r, n], `_other_major`) if its units' rows are contiguous or gathered as columns (`_Term.rows`),
    else (a convolution weight against its input axis: rows of r·n entries, r apart) a contiguous copy where it
    holds up to COPY_UP_TO entries, so that the gathers of every update copy whole rows (the same numbers)."""
    if w.stride(0) < w.stride(-1) or w.is_contiguous() or w.numel() > COPY_UP_TO:
        return w
    return w.contiguous()


_WIDER = {torch.bfloat16: torch.float32, torch.float16: torch.float32}  # see `_widened`


def _widened(w: Tensor) -> Tensor:
    """`w` in float32 if it holds a narrower float (bfloat16, float16: exact), else as it is: the cost products
    and the moved units' differences are formed in float32 (float64 for float64 models), as BLAS multiplies."""
    return w.to(_WIDER[w.dtype]) if w.dtype in _WIDER else w


def _narrow(w: Tensor, axis: Axis) -> Tensor:
    """The slice of `w` that `axis` permutes."""
    start, stop = axis.bounds(w.shape[axis.dim])
    return w.narrow(axis.dim, start, stop - start)


def _pieces(others: list[tuple[Axis, str]], size: int) -> list[tuple[int, int, tuple[Axis, str] | None]]:
    """(start, stop, (axis, group) or None) covering an axis of `size` entries: the given slices and the rest."""
    pieces: list[tuple[int, int, tuple[Axis, str] | None]] = []
    at = 0
    for axis, group in sorted(others, key=lambda item: item[0].start):
        start, stop = axis.bounds(size)
        if start > at:
            pieces.append((at, start, None))
        pieces.append((start, stop, (axis, group)))
        at = stop
    if at < size:
        pieces.append((at, size, None))
    return pieces


def solve_heads(costs: list[Tensor], num_heads: int, move: bool) -> list[Tensor]:
    """Best permutations of head-structured groups tied together (one cost matrix each, maximised).

    Within-head orders are free per group, the head order is shared: for every pair (head a of A, head b of B)
    and group g, v_g(a, b) = max_σ Σ_i C_g[a·d + i, b·d + σ(i)] is a d×d LAP; the head order is the H×H LAP
    ρ = argmax Σ_a Σ_g v_g(a, ρ(a)) (ρ = identity when heads may not move). The result is the exact optimum.
    """
    costs = [cost.cpu() for cost in costs]
    pairs = [(a, b) for a in range(num_heads) for b in range(num_heads)] if move else [(a, a) for a in range(num_heads)]
    head_cost = np.full((num_heads, num_heads), -np.inf)
    within: dict[tuple[int, int, int], np.ndarray] = {}
    for a, b in pairs:
        head_cost[a, b] = 0.0
        for g, cost in enumerate(costs):
            d = cost.shape[0] // num_heads
            block = cost[a * d : (a + 1) * d, b * d : (b + 1) * d].numpy()
            rows, cols = linear_sum_assignment(block, maximize=True)
            within[g, a, b] = cols
            head_cost[a, b] += block[rows, cols].sum()
    order = linear_sum_assignment(head_cost, maximize=True)[1] if move else np.arange(num_heads)
    perms = []
    for g, cost in enumerate(costs):
        d = cost.shape[0] // num_heads
        perms.append(torch.as_tensor(np.concatenate([order[a] * d + within[g, a, order[a]] for a in range(num_heads)])))
    return perms


def _parts(n: int, count: int | None = None) -> list[tuple[int, int]]:
    """[0, n) as ⌈n / CHUNK⌉ (or `count`) near-equal ranges: no sliver of a few rows, whose product BLAS may round
    otherwise."""
    count = count or -(-n // CHUNK)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def _products(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ_j a_j · b_jᵀ ([n, n]) in plain torch on every device (cuBLAS on CUDA): these products carry no
    permutation for `permutation_cost`'s kernel to fuse, the kernel ran 2.7-3.8× slower than torch's gather +
    addmm on an H200 (B5 with its fp32 dot in "ieee", `benchmarks/results_gpu_h200.txt`; its "tf32x3" dot is not yet
    timed), and the op's dispatch costs a process about 2 s at
    its first call (it imports torch._dynamo). Narrow floats are widened first (`_widened`)."""
    a, b = [_widened(x) for x in a], [_widened(x) for x in b]
    return ops_torch.permutation_cost(a, b, [None] * len(a))


def _unit_major(w: Tensor, dim: int, inner: int, n: int) -> Tensor:
    """mat_a(w): [n, m] with the n units of axis `dim` (blocks of `inner`) as rows."""
    return torch.movedim(w, dim, 0).reshape(n, -1)


def _other_major(w: Tensor, dim: int, inner: int, n: int, odim: int, n_q: int, oinner: int) -> Tensor:
    """w as [n_q, r, n]: units of axis `odim` first, units of axis `dim` last, everything else in between (a
    view where the strides allow, as for linear and convolution weights)."""
    moved = torch.movedim(w, (odim, dim), (0, w.dim() - 1))
    moved = moved.reshape(n_q, oinner, *moved.shape[1:-1], n, inner).movedim(-1, -2)
    return moved.reshape(n_q, -1, n)


class _Matcher:
    def __init__(self, spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], params: set[str]):
        self.spec = spec
        self.sizes = spec.sizes(state_a)
        self.terms: dict[str, list[_Term]] = {g: [] for g in spec.groups}
        self.generic: dict[str, list[Axis]] = {g: [] for g in spec.groups}  # rare: recomputed at every visit
        self.state_a, self.state_b = state_a, state_b
        self.device = state_a[min(params)].device if params else torch.device("cpu")  # one for all (`_refuse_spread`)
        self.float64 = any(state_a[key].dtype == torch.float64 for key in params)  # float64 caches and products
        self.const: dict[str, tuple[list[Tensor], list[Tensor]]] = {}  # axes without another permuted axis
        self.dependents: dict[str, set[str]] = {g: set() for g in spec.groups}
        for group, axes in spec.groups.items():
            n = self.sizes[group]
            const_a: list[Tensor] = []
            const_b: list[Tensor] = []
            for axis in axes:
                if axis.tensor not in params:
                    continue  # buffers (running statistics) are permuted but not matched
                wa, wb = (_narrow(state[axis.tensor].detach(), axis) for state in (state_a, state_b))
                others = [(a, g) for a, g in spec.axes_of(axis.tensor) if a.dim != axis.dim]
                if len({a.dim for a, _ in others}) > 1 or any(g == group for _, g in others):
                    self.generic[group].append(axis)
                    for _, q in others:
                        self.dependents[q].add(group)
                    continue
                odim = others[0][0].dim if others else 0
                for start, stop, other in _pieces(others, wa.shape[odim]):  # slices of the other axis, and the rest
                    pa, pb = wa.narrow(odim, start, stop - start), wb.narrow(odim, start, stop - start)
                    if other is None:
                        const_a.append(_unit_major(pa, axis.dim, axis.inner, n))
                        const_b.append(_unit_major(pb, axis.dim, axis.inner, n))
                        continue
                    oaxis, q = other
                    shape = (axis.dim, axis.inner, n, odim, self.sizes[q], oaxis.inner)
                    self.terms[group].append(_Term(q, _local(_other_major(pa, *shape)), _local(_other_major(pb, *shape))))
                    self.dependents[q].add(group)
            self.const[group] = (const_a, const_b)
        self.cache: dict[str, Tensor] = {}
        self.reused = _Reused()  # the updates' large temporaries and the float64 caches' product rows
        self.self_dependent = any(g in deps for g, deps in self.dependents.items())

    def _updates(
        self, group: str, terms: list[_Term], perms: dict[str, Tensor], lanes: ThreadPoolExecutor | None = None
    ) -> Iterator[None]:
        """Bring `terms` of C_group to the current permutations, in their order (the cache's summation order):
        yielding after each block of rows, or, with `lanes` and more than one block, each term's blocks in two lanes
        (`_in_two_lanes`)."""
        n = self.sizes[group]
        cache = self.cache.get(group)
        if cache is None:
            const_a, const_b = self.const.pop(group)
            float32 = (n <= FLOAT32_UP_TO or n >= FLOAT32_FROM) and not self.float64
            dtype = torch.float32 if float32 else torch.float64
            if const_a:
                cache = _products(const_a, const_b).to(dtype)
            else:
                cache = torch.zeros(n, n, dtype=dtype, device=self.device)
            self.cache[group] = cache
        due: list[tuple[_Term, Tensor | None, Tensor]] = []  # (term, moved units or None: all, permutation now)
        for term in terms:
            now = perms[term.other]
            units = None if term.seen is None else torch.nonzero(now != term.seen).flatten()  # None: first visit
            if units is None or units.numel():
                due.append((term, units, now))
        for term, units, now in due:
            if lanes is not None and (n > CHUNK or 2 * LANE_ROWS <= n <= SERIAL_UP_TO and term.rank(units) >= LANE_RANK):
                _in_two_lanes(cache, term, units, now, lanes, self.reused)
                yield
            else:
                b = term.moved(units, now, self.reused)
                for start, stop in _parts(n):
                    a = term.rows(term.a[..., start:stop], units, self.reused, "a").T
                    _add_rows(cache, start, stop, a, b, self.reused)
                    yield
            term.seen = now

    def update_ahead(self, group: str, perms: dict[str, Tensor], moving: set[str], lap: Future) -> None:
        """While `lap` (the solve of the groups `moving`) runs on another thread, on one thread: the updates of
        C_group's leading terms whose other group is not moving, as its visit (due next) would add them first.
        Torch's threads are restored as soon as `lap` is done."""
        leading = list(itertools.takewhile(lambda term: term.other not in moving, self.terms[group]))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in self._updates(group, leading, perms):
                if torch.get_num_threads() != threads and lap.done():
                    torch.set_num_threads(threads)
        finally:
            torch.set_num_threads(threads)

    def cost(self, group: str, perms: dict[str, Tensor], lanes: ThreadPoolExecutor | None = None) -> Tensor:
        """C_group for the current permutations, updated in place where possible, on the weights' device: float32
        up to FLOAT32_UP_TO and from FLOAT32_FROM units (each update a float32 product accumulated in place, as the
        port's products are), float64 in between and for float64 models. `lanes`: an idle one-thread executor for
        `_in_two_lanes`."""
        n = self.sizes[group]
        for _ in self._updates(group, self.terms[group], perms, lanes):
            pass
        cache = self.cache[group]
        if not self.generic[group]:
            return cache
        total = cache.to(torch.float64, copy=True)
        for axis in self.generic[group]:  # a tensor with three permuted axes, or two of one group
            wb = self.state_b[axis.tensor]
            for other, q in self.spec.axes_of(axis.tensor):
                if other.dim != axis.dim:
                    wb = wb.index_select(other.dim, axis_index(perms[q].to(wb.device), other, wb.shape[other.dim]))
            a = _unit_major(_narrow(self.state_a[axis.tensor], axis), axis.dim, axis.inner, n)
            total += _products([a], [_unit_major(_narrow(wb, axis), axis.dim, axis.inner, n)]).double()
        return total


def _add_rows(cache: Tensor, start: int, stop: int, a: Tensor, b: Tensor, reused: _Reused) -> None:
    """C[R] += A[:, R]ᵀ·B for the rows R = [start, stop) of the cache: `a` A's gather [R, |K|·r] (`_Term.rows`),
    `b` = `_Term.moved` ([|K|·r, n]). A float32 cache: in place (addmm). A float64 cache: the float32 product of R
    rows widened in kept rows (`_product_rows`), then added; float64 products of small ranks measured 2-16 %
    slower (at 512 units, when its caches were float64)."""
    if cache.dtype == torch.float32 or a.dtype == torch.float64:  # float64 models: float64 products
        cache[start:stop].addmm_(a, b)
        return
    cache[start:stop] += _product_rows(cache, a, b, reused)


def _product_rows(cache: Tensor, a: Tensor, b: Tensor, reused: _Reused) -> Tensor:
    """A·B ([R, n], float32 products) widened to the float64 `cache`'s dtype, both in rows kept per thread in
    `reused` whatever their size (fresh temporaries cost page faults, a mixed-dtype `+=` a hidden float64 copy; at
    2048 units 48 MB a thread): a view of the kept rows, valid until this thread's next product."""
    shape = (a.shape[0], cache.shape[1])
    product = reused.empty("product", shape, torch.float32, cache.device, always=True)
    torch.mm(a, b, out=product)
    return reused.empty("widened", shape, cache.dtype, cache.device, always=True).copy_(product)


def _in_two_lanes(cache: Tensor, term: _Term, units: Tensor | None, now: Tensor, lanes: ThreadPoolExecutor,
                  reused: _Reused) -> None:
    """The update of the cache's blocks of rows by `term` (`_parts`; of a group of at most CHUNK units, blocks of
    about LANE_ROWS), each block taken by whichever of this thread and `lanes`' one is free, each with half of
    torch's threads (at least one): the gathers (single-threaded copies) run two at a time too, and on a busy
    machine a lane that is not scheduled leaves its blocks to the other. Each block's numbers are those of
    `_add_rows`: MKL's products of blocks of 64 rows or more give the same bits with one thread as with two
    (measured on blocks of 66 to 2048 rows, 200 to 8192 columns, ranks 1 to 1000; tiny ones do not), and the
    rows of a product do not depend on the rows beside them (blocks of 64 rows and more, ranks 1 to 4608: a
    small group's blocks give its one product of one thread; `test_two_lanes_give_the_same_bits`)."""
    threads = torch.get_num_threads()
    n = cache.shape[0]
    parts = iter(_parts(n) if n > CHUNK else _parts(n, max(2, n // LANE_ROWS)))
    taking = threading.Lock()
    b: Future = Future()

    def lane(share: int) -> None:
        torch.set_num_threads(share)
        while True:
            with taking:
                part = next(parts, None)
            if part is None:
                return
            start, stop = part
            a = term.rows(term.a[..., start:stop], units, reused, "a").T
            _add_rows(cache, start, stop, a, b.result(), reused)

    other = lanes.submit(lane, max(1, threads // 2))
    try:
        torch.set_num_threads(max(1, threads - threads // 2))
        try:
            b.set_result(term.moved(units, now, reused))
        except BaseException as error:
            b.set_exception(error)
            raise
        lane(max(1, threads - threads // 2))
    finally:
        other.exception()  # wait for the other lane (its error, if any, is b's or raised below)
        torch.set_num_threads(threads)
    other.result()


@contextmanager
def _one_torch_thread(serial: bool) -> Iterator[None]:
    """torch on one thread inside (if `serial`), the caller's count restored after. The sweeps of small groups run
    hundreds of torch ops of a few hundred microseconds each; on more threads each is a parallel region whose
    threads must all run to its end, and on a shared machine one descheduled thread stalls it for a time slice
    (at load ~4 on 2 cores a 512×512 product took 20-30 ms on 2 threads against 7 ms on one, a dot product of the
    objective's 64k chunks 8 ms against 0.02). The products' blocking does not depend on the thread count (the
    caches and permutations are the same bit for bit); the objective's sums are then those of one thread."""
    threads = torch.get_num_threads()
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(threads)


def _next_unit(order: list[tuple[str, ...]], at: int, dirty: set[str], changed: set[str]) -> int | None:
    """The position of the first unit after order[at] that is due (dirty) or among `changed` (the dependents of
    order[at], due if its solve moves a unit); the units in between stay skipped. None if none in this sweep."""
    for later in range(at + 1, len(order)):
        if not (dirty.isdisjoint(order[later]) and changed.isdisjoint(order[later])):
            return later
    return None


def _solvable_alongside(
    order: list[tuple[str, ...]], at: int, dirty: set[str], dependents: dict[str, set[str]], tie_of: Mapping[str, object]
) -> int | None:
    """The position of the unit that the sweep solves next after order[at] where its LAP may be solved now, at
    the same time, with the same result: a single group, due (dirty), whose cost the solve of order[at] leaves
    as it is (not among its dependents), with nothing solved in between (the units between are not due, and
    not among the dependents, so they stay skipped). None otherwise."""
    changed = set().union(*(dependents[group] for group in order[at]))
    later = _next_unit(order, at, dirty, changed)
    if later is None or not changed.isdisjoint(order[later]) or order[later][0] in tie_of:
        return None
    return later


def _updated_ahead(
    order: list[tuple[str, ...]], at: int, dirty: set[str], dependents: dict[str, set[str]], tie_of: Mapping[str, object]
) -> str | None:
    """The group whose cost may be updated while order[at] is solved (`_Matcher.update_ahead`): the single group
    that the sweep solves next whatever that solve returns (due now, nothing due in between). None otherwise."""
    changed = set().union(*(dependents[group] for group in order[at]))
    later = _next_unit(order, at, dirty, changed)
    if later is None or dirty.isdisjoint(order[later]) or order[later][0] in tie_of:
        return None
    return order[later][0]


def matching_objective(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], permutation: Permutation, params: set[str]
) -> float:
    """J(π) = Σ over parameters of ⟨W_A, π(W_B)⟩ in float64 (the products of float32 entries exact), one tensor at a
    time (those whose groups all keep their order not permuted): on the CPU numpy's einsum, which widens a few
    thousand entries at a time as it sums (2.2× faster than torch's dot of widened chunks, no temporaries); other
    devices and dtypes torch's dot of OBJECTIVE_CHUNK entries widened at a time."""
    permutation.check(state_b)
    perms = permutation.perms
    unmoved = {g for g, perm in perms.items() if torch.equal(perm, torch.arange(len(perm), device=perm.device))}
    total = 0.0
    for key in sorted(params):
        a = state_a[key].detach().reshape(-1)
        b = state_b[key].detach()
        if any(group not in unmoved for _, group in permutation.spec.axes_of(key)):
            b = permutation.permute_tensor(key, b)
        b = b.reshape(-1)
        if _numpy_reads(a, b):
            total += float(np.einsum("i,i->", a.numpy(), b.numpy(), dtype=np.float64))
            continue
        for a_part, b_part in zip(a.split(OBJECTIVE_CHUNK), b.split(OBJECTIVE_CHUNK)):
            total += torch.dot(a_part.double(), b_part.double()).item()
    return total


def _objective_beside(serial: bool, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                      permutation: Permutation, params: set[str]) -> float:
    """`matching_objective` on the second thread, with torch's threads as on the first (`_one_torch_thread`): J
    before the first sweep, computed beside the final one."""
    with _one_torch_thread(serial):
        return matching_objective(state_a, state_b, permutation, params)


def _cost_and_solve(matcher: _Matcher, group: str, perms: dict[str, Tensor], warm: WarmStart | None
                    ) -> tuple[Tensor, tuple[Tensor, WarmStart | None]]:
    """C_group brought up to date and its LAP solved, on the calling thread (the second of two chains)."""
    with torch.no_grad():
        cost = matcher.cost(group, perms)
        return cost, lap_loading.solve(cost, warm)


def _refuse_spread(state: Mapping[str, Tensor], params: set[str]) -> None:
    """A SpecError unless the matched tensors lie on one device (the cost products run there)."""
    devices = {state[key].device for key in params}
    if len(devices) > 1:
        raise SpecError(f"the models' weights lie on several devices ({', '.join(sorted(map(str, devices)))}): move "
                        f"each model to one device first, e.g. model.to({str(state[min(params)].device)!r})")


def _refuse_non_finite(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], params: set[str]) -> None:
    """A ValueError naming the first parameter holding NaN or infinite values, if any. Screened first by each pair
    of tensors' dot product (numpy's on the CPU: 0.1-0.2 ms for B4's 512-unit MLPs, against 1.1-3 ms for J in
    float64), which any NaN or ±∞ entry makes non-finite; only where one is not (or where it overflowed) is every
    entry tested."""
    if all(_finite_dot(state_a[key], state_b[key]) for key in params):
        return
    for label, state in (("model_a", state_a), ("model_b", state_b)):
        bad = next((key for key in sorted(params) if not torch.isfinite(state[key]).all()), None)
        if bad is not None:
            raise ValueError(f"{label}'s {bad} holds NaN or infinite values: weight matching needs finite weights")


def _finite_dot(a: Tensor, b: Tensor) -> bool:
    """Whether ⟨a, b⟩ (the same shape) is finite: not where either holds NaN or ±∞ (or where the sum overflows)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if _numpy_reads(a, b):
        with np.errstate(all="ignore"):  # an overflow is an answer here, not a warning
            return math.isfinite(float(np.dot(a.numpy(), b.numpy())))
    return math.isfinite(torch.dot(a.double(), b.to(a.device).double()).item())


def weight_matching(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    spec: PermutationSpec | None = None,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    max_iter: int = 100,
    seed: int = 0,
    init: Permutation | Mapping[str, Tensor] | None = None,
    on_visit: Callable[[str, Tensor], None] | None = None,
) -> Permutation:
    """Permutation of model_b's hidden units that maximises Σ_ℓ ⟨W_A^ℓ, π(W_B^ℓ)⟩ (Ainsworth et al. 2023, Alg. 1).

    The models are modules, state dicts, or paths of saved state dicts, read memory-mapped (see `sources.py`;
    then `spec` is needed). The spec is derived from model_a and `example_input` unless given. Returns a
    Permutation whose `apply(model_b)` gives the aligned model; `objective_history` and `iterations` (sweeps)
    record the run. `on_visit(group, perm)`, if given, is called after every solve of a group's LAP with the
    permutation it chose (groups none of whose neighbours changed since their last solve are not solved again).
    """
    state_a, state_b = read_source(model_a, "model_a"), read_source(model_b, "model_b")
    if isinstance(model_a, nn.Module) and isinstance(model_b, nn.Module):
        check_same_architecture(model_a, model_b)
    else:
        check_same_states(state_a, state_b)
    if spec is None:
        if example_input is None or not isinstance(model_a, nn.Module):
            raise SpecError(
                "weight_matching needs spec=, or example_input= with model_a a module to derive one "
                "(permutation_spec(model, example_input) derives it once for state dicts and files)"
            )
        spec = permutation_spec(model_a, example_input)
    elif example_input is not None and spec.example_input is None:
        spec = PermutationSpec(spec.groups, example_input=as_args(example_input), heads=spec.heads)
    spec.sizes(state_a)
    spec.sizes(state_b)
    params = objective_tensors(model_a, state_a)
    _refuse_spread(state_a, params)
    keep_freed_memory()  # the visits' products and LAPs free megabytes each: no page faults again each call
    start = Permutation.identity(spec, state_a)
    if init is not None:
        perms = init.perms if isinstance(init, Permutation) else init
        start.perms.update({g: torch.as_tensor(p, dtype=torch.long, device="cpu").clone() for g, p in perms.items()})
    perms = start.perms
    if max(map(len, perms.values()), default=0) > lap_loading.SCIPY_WHILE_LOADING:
        lap_loading.start()  # this call's large LAPs need the compiled solver: load it while the costs are formed
    serial = torch.get_num_threads() > 1 and max(spec.sizes(state_a).values(), default=0) <= SERIAL_UP_TO
    _refuse_non_finite(state_a, state_b, params)
    initial = Permutation(spec, dict(perms))  # J there is computed at the end, beside the final J
    ends: list[float] = []  # per sweep: J computed directly where the spec is self-dependent, else the sweep's gain
    matcher = _Matcher(spec, state_a, state_b, params)
    tie_of = {g: tie for tie in spec.heads.values() for g in tie.groups}
    units: list[tuple[str, ...]] = []  # what one step solves: a group, or an attention module's tied groups
    for group in spec.groups:
        if group not in tie_of:
            units.append((group,))
        elif group == tie_of[group].groups[0]:
            units.append(tie_of[group].groups)
    dirty = set(spec.groups)
    warm: dict[str, WarmStart | None] = {}  # per group, what its last LAP leaves for the next
    early: dict[int, tuple[Tensor, Tensor]] = {}  # sweep position -> (cost, permutation) of a LAP solved ahead
    pairs = torch.get_num_threads() > 1  # two LAPs at once where the order allows (see `_solvable_alongside`)
    sweeps = 0
    # the second thread runs torch on one thread from its start: a new thread's MKL products otherwise run on every
    # core whatever torch.get_num_threads() says there (a call's first pair of chains, before any lane set a count,
    # had its second 512-unit product take both cores beside the first's)
    second = ThreadPoolExecutor(1, thread_name_prefix="modeconn_fast-lap", initializer=torch.set_num_threads, initargs=(1,))
    with torch.no_grad(), second as pool, _one_torch_thread(serial):
        lap_lanes = pool if pairs else None  # idle while a LAP is solved alone: half of its passes over whole rows
        lanes = lap_lanes if matcher.device.type == "cpu" else None  # ... and while the costs are updated on the CPU
        for sweep in range(max_iter):
            sweeps += 1
            progress, gain_total = False, 0.0
            order = [units[index] for index in sweep_order(len(units), seed, sweep)]
            for at, unit in enumerate(order):
                if dirty.isdisjoint(unit):
                    continue
                if at in early:
                    cost, col = early.pop(at)
                    costs, cols = [cost], [col]
                elif unit[0] in tie_of:
                    costs = [matcher.cost(group, perms, lanes) for group in unit]
                    cols = solve_heads(costs, tie_of[unit[0]].num_heads, tie_of[unit[0]].move)
                else:
                    later = _solvable_alongside(order, at, dirty, matcher.dependents, tie_of) if pairs else None
                    if later is not None and serial:  # two chains: the later group's cost and its LAP on the second thread
                        ahead = order[later][0]
                        chain = pool.submit(_cost_and_solve, matcher, ahead, perms, warm.get(ahead))
                        costs = [matcher.cost(unit[0], perms)]
                        col, warm[unit[0]] = lap_loading.solve(costs[0], warm.get(unit[0]))
                        ahead_cost, (ahead_col, warm[ahead]) = chain.result()
                        early[later] = (ahead_cost, ahead_col)
                    else:
                        costs = [matcher.cost(unit[0], perms, lanes)]
                        following = _updated_ahead(order, at, dirty, matcher.dependents, tie_of) if pairs and later is None else None
                        if following is not None:  # the LAP on a second thread, the next group's leading updates beside it
                            future = pool.submit(lap_loading.solve, costs[0], warm.get(unit[0]))
                            matcher.update_ahead(following, perms, set(unit), future)
                            col, warm[unit[0]] = future.result()
                        elif later is None:  # alone: the idle second lane takes half of its passes over whole rows
                            col, warm[unit[0]] = lap_loading.solve(costs[0], warm.get(unit[0]), lap_lanes)
                        else:  # both costs first, then the two LAPs (numba, no GIL) on two threads
                            ahead = order[later][0]
                            ahead_cost = matcher.cost(ahead, perms, lanes)
                            future = pool.submit(lap_loading.solve, costs[0], warm.get(unit[0]))
                            ahead_col, warm[ahead] = lap_loading.solve(ahead_cost, warm.get(ahead))
                            early[later] = (ahead_cost, ahead_col)
                            col, warm[unit[0]] = future.result()
                    cols = [col]
                for group, cost, col in zip(unit, costs, cols):
                    dirty.discard(group)
                    if on_visit is not None:
                        on_visit(group, col)
                    if not torch.equal(col, perms[group]):
                        old = cost.gather(1, perms[group][:, None].to(cost.device)).double().sum().item()
                        new = cost.gather(1, col[:, None].to(cost.device)).double().sum().item()
                        perms[group] = col
                        dirty |= matcher.dependents[group]
                        gain_total += new - old
                        progress = progress or new - old > 1e-12 * (1.0 + abs(new))
            ends.append(matching_objective(state_a, state_b, start, params) if matcher.self_dependent else gain_total)
            if not progress:
                break
        lap_loading.start()  # for the next call, in the background (the first call's small LAPs went to scipy)
        self_dependent = matcher.self_dependent
        del matcher  # its cost matrices (n×n per group) are not needed for the objective
        first = pool.submit(_objective_beside, serial, state_a, state_b, initial, params) if pairs else None
        last = ends[-1] if self_dependent and ends else matching_objective(state_a, state_b, start, params)
        history = [first.result() if first is not None else matching_objective(state_a, state_b, initial, params)]
    for value in ends:
        history.append(value if self_dependent else history[-1] + value)
    history[-1] = last
    return Permutation(spec, perms, objective_history=history, iterations=sweeps)
