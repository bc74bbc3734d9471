"""B1 grid-tiny: MLP 64-32-32-10, 512 evaluation samples, a 100×100 plane through three models; and the
target's 1000×1000 grid of the same plane (ours timed, the peers extrapolated per point from the 100×100 run).
Both rows give the fraction of the physical floor: counted FLOPs per point at the fp32 GEMM rate of the run."""
from __future__ import annotations

import statistics
from typing import Any

from modeconn_fast.digits import load_digits_split

from .harness import GEMM_FLOPS, GEMM_NAME, PeerTime, Row, compare, target_met, time_once
from .peers.vmap import VmapPeer
from .plane import RTOL, Plane, PlaneSize, flops_per_point, grid, measure, plane_rows, prepare as prepare_plane, subset

WORKLOAD = "B1 grid-tiny"
WIDTHS = (64, 32, 32, 10)
SAMPLES = 512
FULL = PlaneSize(side=100, peer_points=10_000, vmap_chunk=16, repeats=5)
QUICK = PlaneSize(side=30, peer_points=225, vmap_chunk=16, repeats=9)
BIG_SIDE = 1000
QUICK_BIG_ROWS = 5  # --quick times this many x-rows of the 1000×1000 grid and extrapolates
QUICK_BIG_REPEATS = 5  # ... the median of this many timings (one of ~0.1 s moved by up to 2× on a shared machine)
SPOT_CHECK_POINTS = 64
TARGET_RATIO, TARGET_BIG_SECONDS = 3.0, 30.0


def prepare(size: PlaneSize) -> Plane:
    digits = load_digits_split()
    inputs, targets = digits.train
    return prepare_plane(WIDTHS, digits.train, (inputs[:SAMPLES], targets[:SAMPLES]), size)


def big_grid_row(plane: Plane, small: Row, x_rows: int, gemm_rate: float) -> Row:
    """Ours on the 1000×1000 grid (its first `x_rows` rows of x when fewer than 1000: extrapolated), spot-checked
    against the vmap peer; peers' times are their per-point times of `small` scaled to 10⁶ points. The ceiling:
    the counted FLOPs of one forward per point at `gemm_rate` (measured with `small`) over ours."""
    total = BIG_SIDE * BIG_SIDE
    coeffs = plane_rows(grid(BIG_SIDE)[: x_rows * BIG_SIDE])
    repeats = 1 if x_rows >= BIG_SIDE else QUICK_BIG_REPEATS  # the whole grid takes seconds: one timing suffices
    timings = [time_once(lambda: plane.ours(coeffs)) for _ in range(repeats)]
    seconds, losses = statistics.median(t for t, _ in timings), timings[0][1]
    spot = subset(coeffs.shape[0], SPOT_CHECK_POINTS)
    vmap_losses = VmapPeer(plane.models[0], plane.members, 64).losses(coeffs[spot], plane.inputs, plane.targets)
    spot_check = compare(losses[spot], vmap_losses, rtol=RTOL)
    peers = [PeerTime(p.name, p.seconds / small.points * total, p.measured_points, p.check, p.check_ok) for p in small.peers]
    row = Row(WORKLOAD, f"{BIG_SIDE}×{BIG_SIDE} grid of the same plane", total, seconds * total / coeffs.shape[0],
              peers, ours_measured_points=coeffs.shape[0], target=f"≤ {TARGET_BIG_SECONDS:.0f} s (ours)")
    floor = flops_per_point(WIDTHS, plane.inputs.shape[0]) * total / gemm_rate
    row.ceiling = f"ours {floor / row.ours_s:.2f} of fp32 GEMM (floor {floor:.1f} s at {gemm_rate / 1e9:.0f} GFLOP/s)"
    row.met = spot_check.ok and row.ours_s <= TARGET_BIG_SECONDS
    row.note = (f"1000×1000: ours timed {'once' if repeats == 1 else f'{repeats} times (the median)'} on "
                f"{coeffs.shape[0]:,} points"
                + (" and extrapolated" if coeffs.shape[0] < total else "")
                + f"; spot check vs vmap at {SPOT_CHECK_POINTS} points {spot_check}; peers extrapolated per point "
                  f"from the {small.case} row")
    return row


def run(quick: bool = False) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    plane = prepare(size)
    row, medians = measure(plane, size, WORKLOAD, f"{size.side}×{size.side} plane, MLP 64-32-32-10, {SAMPLES} samples",
                           widths=WIDTHS)
    row.target = f"≥ {TARGET_RATIO:g}× fastest peer"
    row.met = target_met(row.ratio, TARGET_RATIO, row.checks_ok)
    big = big_grid_row(plane, row, QUICK_BIG_ROWS if quick else BIG_SIDE, GEMM_FLOPS / medians[GEMM_NAME])
    return [row.to_dict(), big.to_dict()]
