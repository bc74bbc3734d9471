"""B2 grid-wide: MLP 64-512-512-10, all 1,797 digits, a 20×20 plane through three models; the ceiling is the
fp32 GEMM rate (2048² torch.matmul) timed among the contenders."""
from __future__ import annotations

from typing import Any

import torch

from modeconn_fast.digits import load_digits_split

from .harness import target_met
from .plane import Plane, PlaneSize, measure, prepare as prepare_plane

WORKLOAD = "B2 grid-wide"
WIDTHS = (64, 512, 512, 10)
FULL = PlaneSize(side=20, peer_points=400, vmap_chunk=4, repeats=3)
QUICK = PlaneSize(side=6, peer_points=36, vmap_chunk=4, repeats=7, epochs=10)
TARGET_RATIO = 1.15


def prepare(size: PlaneSize) -> Plane:
    digits = load_digits_split()
    everything = tuple(torch.cat([a, b]) for a, b in zip(digits.train, digits.test))
    return prepare_plane(WIDTHS, digits.train, everything, size)


def run(quick: bool = False) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    plane = prepare(size)
    samples = plane.inputs.shape[0]
    row, _ = measure(plane, size, WORKLOAD, f"{size.side}×{size.side} plane, MLP 64-512-512-10, {samples:,} samples",
                     widths=WIDTHS)
    row.target = f"≥ {TARGET_RATIO:g}× fastest peer"
    row.met = target_met(row.ratio, TARGET_RATIO, row.checks_ok)
    return [row.to_dict()]
