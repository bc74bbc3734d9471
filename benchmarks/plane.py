"""Planes through three trained MLPs (workloads B1 and B2): the project and its three peers on one grid.

The plane is the basis (m0, m1 − m0, m2 − m0) with coefficient rows (1, x, y); the grid spans x, y ∈ [0, 1)
in steps of 1/side, as loss-landscapes' planar_interpolation walks it. Every contender returns the mean
cross-entropy per point; the checks compare each peer with the project at the very points the peer evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

import modeconn_fast
from modeconn_fast.digits import mlp, train_classifier

from .harness import GEMM_FLOPS, GEMM_NAME, Check, Contender, Row, compare, gemm_contender, interleaved_medians, peer_times, threads
from .peers.landscapes import planar_losses, visited_coordinates
from .peers.state_dict_loop import loop_losses
from .peers.vmap import VmapPeer

PLANE = torch.tensor([[1.0, 0, 0], [-1, 1, 0], [-1, 0, 1]])  # (m0, m1, m2) -> (m0, m1 − m0, m2 − m0)
RTOL = 1e-4


@dataclass(frozen=True)
class PlaneSize:
    """side×side points; peers evaluate at most `peer_points` of them (then extrapolate per point). vmap_chunk:
    points per vmap call, the fastest of 16/64/256/1024 (B1) and 1/4/8/16 (B2) tried on the 2-core machine."""

    side: int
    peer_points: int
    vmap_chunk: int
    repeats: int
    epochs: int = 40


@dataclass
class Plane:
    models: list[nn.Module]  # m0, m1, m2; m0 doubles as the architecture
    basis: modeconn_fast.Basis  # the project's plane basis
    members: list[dict[str, Tensor]]  # the same basis as plain state dicts, for the peers
    inputs: Tensor
    targets: Tensor
    coeffs: Tensor  # [side², 3]
    side: int

    def ours(self, coeffs: Tensor) -> Tensor:
        """The project: mean cross-entropy at every row of coeffs, in one `evaluate` call."""
        result = modeconn_fast.evaluate(self.models[0], self.basis, coeffs, (self.inputs, self.targets),
                                        metrics=("loss",), progress=False)
        return result["loss"]


def grid(side: int) -> Tensor:
    """[side², 2] coordinates x = i/side, y = j/side (i major)."""
    steps = torch.arange(side, dtype=torch.float64) / side
    x, y = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def plane_rows(xy: Tensor) -> Tensor:
    """Coefficient rows (1, x, y) over the basis (m0, m1 − m0, m2 − m0)."""
    return torch.cat([torch.ones(xy.shape[0], 1, dtype=xy.dtype), xy], dim=1).float()


def train_models(widths: Sequence[int], train: tuple[Tensor, Tensor], epochs: int, seeds: Sequence[int] = (0, 1, 2)) -> list[nn.Module]:
    """Digits MLPs from fixed seeds (one torch thread: tiny steps only lose from more)."""
    with threads(1):
        return [train_classifier(mlp(widths, seed=s), train, epochs=epochs, seed=s, progress=False) for s in seeds]


def prepare(widths: Sequence[int], train: tuple[Tensor, Tensor], data: tuple[Tensor, Tensor], size: PlaneSize) -> Plane:
    models = train_models(widths, train, size.epochs)
    states = [{n: t.detach().clone() for n, t in m.state_dict().items()} for m in models]
    members = [states[0]] + [{n: s[n] - states[0][n] for n in s} for s in states[1:]]
    basis = modeconn_fast.Basis.from_members(models).transform(PLANE)
    return Plane(models, basis, members, data[0], data[1], plane_rows(grid(size.side)), size.side)


def subset(points: int, count: int) -> Tensor:
    """`count` indices spread evenly over range(points)."""
    if count >= points:
        return torch.arange(points)
    return torch.linspace(0, points - 1, count).round().long()


PeerPoints = dict[str, tuple[Tensor, Tensor | None]]  # peer -> (its coefficient rows, their index in the grid)


def contenders(plane: Plane, size: PlaneSize) -> tuple[Contender, list[Contender], PeerPoints]:
    """(ours, peers, the points each peer evaluates); peers run on at most size.peer_points points."""
    total = plane.coeffs.shape[0]
    index = subset(total, size.peer_points)
    rows = plane.coeffs[index]
    steps = min(plane.side, int(size.peer_points**0.5))
    vmap_peer = VmapPeer(plane.models[0], plane.members, size.vmap_chunk)
    start, one, two = plane.models
    ours = Contender("ours", lambda: plane.ours(plane.coeffs), total, total)
    peers = [
        Contender("loss-landscapes", lambda: planar_losses(start, one, two, plane.inputs, plane.targets, steps),
                  steps * steps, total),
        Contender("vmap", lambda: vmap_peer.losses(rows, plane.inputs, plane.targets), len(index), total),
        Contender("load_state_dict loop", lambda: loop_losses(plane.models[0], plane.members, rows, plane.inputs,
                                                              plane.targets), len(index), total),
    ]
    points = {"loss-landscapes": (plane_rows(visited_coordinates(steps)), None), "vmap": (rows, index),
              "load_state_dict loop": (rows, index)}
    return ours, peers, points


def check_peers(plane: Plane, ours_losses: Tensor, peers: list[Contender], points: PeerPoints) -> dict[str, Check]:
    """Run every peer once (warm-up) and compare with the project at the same points (rel ≤ 1e-4); points off
    the grid (loss-landscapes' own walk) are evaluated by the project for the check."""
    checks = {}
    for peer in peers:
        rows, index = points[peer.name]
        expected = ours_losses[index] if index is not None else plane.ours(rows)
        checks[peer.name] = compare(expected, peer.run(), rtol=RTOL)
    return checks


def flops_per_point(widths: Sequence[int], samples: int) -> int:
    """Multiply-adds ×2 of one forward of the MLP over `samples` inputs (what a per-point peer must do)."""
    return 2 * samples * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def measure(plane: Plane, size: PlaneSize, workload: str, case: str, widths: Sequence[int] | None = None) -> tuple[Row, dict[str, float]]:
    """Check, then time ours and the peers alternating (with the GEMM ceiling among them when `widths` is given).

    Returns the row (target left to the caller) and the medians per call."""
    ours, peers, points = contenders(plane, size)
    checks = check_peers(plane, ours.run(), peers, points)
    ceiling = [gemm_contender()] if widths is not None else []
    medians = interleaved_medians([ours, *peers, *ceiling], size.repeats)
    row = Row(workload, case, ours.total_points, medians["ours"], peer_times(peers, medians, checks))
    if widths is not None:
        rate = GEMM_FLOPS / medians[GEMM_NAME]
        flops = flops_per_point(widths, plane.inputs.shape[0]) * ours.total_points
        fastest = row.fastest_peer
        row.ceiling = (f"ours {flops / row.ours_s / rate:.2f}, fastest peer {flops / fastest.seconds / rate:.2f} "
                       f"of fp32 GEMM ({rate / 1e9:.0f} GFLOP/s)")
    return row, medians
