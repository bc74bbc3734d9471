"""B3 curve-bn: a small CNN with BatchNorm on the 8×8 digits, a quadratic Bezier curve over three trained models,
61 points, BatchNorm statistics recomputed per point on the training split, then train and test loss and error.

The project runs what a user runs: one `evaluate_curve` call over both splits, {"train": ..., "test": ...},
with BatchNorm recomputed on the training batches. The peer is the 2018 reference algorithm (`peers/reference_bn.py`). Both see the training split in the
reference's loader batches of 128, unshuffled, so the recomputed statistics are the same numbers. The middle
control point θ_1 is a third independently trained model (this measures evaluation, not curve training).
The ceiling column: per point, the convolution and linear FLOPs (`flops.py`) of a forward over both splits plus
the BatchNorm recomputation's forward over the training split up to the last BatchNorm, at the fp32 GEMM rate
timed among the contenders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import modeconn_fast
from modeconn_fast.digits import load_digits_split, train_classifier

from .flops import forward_flops
from .harness import (GEMM_FLOPS, GEMM_NAME, Check, Contender, Row, combine, compare, gemm_contender,
                      interleaved_medians, peer_times, target_met, threads)
from .peers.reference_bn import curve_metrics
from .plane import subset

WORKLOAD = "B3 curve-bn"
BATCH = 128  # the reference code's loader batch size
ATOL = 1e-4
TARGET_RATIO = 5.0
METRICS = ("train_loss", "train_error", "test_loss", "test_error")
Batches = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class CurveSize:
    points: int
    peer_points: int  # the reference runs at most this many points (then extrapolated per point)
    repeats: int
    epochs: int


FULL = CurveSize(points=61, peer_points=61, repeats=3, epochs=15)
QUICK = CurveSize(points=11, peer_points=5, repeats=9, epochs=5)


def cnn(seed: int) -> nn.Sequential:
    """Conv(1→16)-BN-ReLU-pool, Conv(16→32)-BN-ReLU-pool, Linear(128→10), on [N, 1, 8, 8] images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    )


def batches(data: tuple[Tensor, Tensor]) -> Batches:
    inputs, targets = data
    return [(inputs[i:i + BATCH], targets[i:i + BATCH]) for i in range(0, len(targets), BATCH)]


@dataclass
class Curve:
    models: list[nn.Module]
    curve: modeconn_fast.BezierCurve
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    coeffs: Tensor  # the curve's rows at the evaluated t

    def ours(self, points: int) -> dict[str, Tensor]:
        """One evaluate_curve call over both splits: BatchNorm recomputed once per point on the training batches."""
        result = modeconn_fast.evaluate_curve(self.curve, {"train": self.train, "test": self.test}, points=points,
                                              bn_data=batches(self.train), progress=False)
        return dict(result.columns)

    def reference(self, coeffs: Tensor) -> dict[str, Tensor]:
        members = [m.state_dict() for m in self.models]  # the control points A, θ_1, B
        return curve_metrics(self.models[0], members, coeffs, batches(self.train), batches(self.test))


def prepare(size: CurveSize) -> Curve:
    digits = load_digits_split()
    images = [(x.reshape(-1, 1, 8, 8), y) for x, y in (digits.train, digits.test)]
    with threads(1):
        models = [train_classifier(cnn(s), images[0], epochs=size.epochs, seed=s, progress=False) for s in (0, 1, 2)]
    curve = modeconn_fast.BezierCurve(models[0], models[2], bends=1)
    curve.control_points[1].load_state_dict(models[1].state_dict())
    coeffs = curve.coefficients(torch.linspace(0, 1, size.points, dtype=torch.float64)).float()
    return Curve(models, curve, images[0], images[1], coeffs)


def contenders(curve: Curve, size: CurveSize) -> tuple[Contender, Contender, Tensor]:
    """(ours on all points, the reference on at most size.peer_points of them, those points' indices)."""
    total = curve.coeffs.shape[0]
    index = subset(total, size.peer_points)
    ours = Contender("ours", lambda: curve.ours(total), total, total)
    peer = Contender("2018 reference", lambda: curve.reference(curve.coeffs[index]), len(index), total)
    return ours, peer, index


def check(ours: dict[str, Tensor], peer: dict[str, Tensor], index: Tensor) -> Check:
    """Every metric at every point the reference ran: |ours − reference| ≤ 1e-4."""
    return combine([compare(ours[m][index], peer[m], atol=ATOL) for m in METRICS])


def flops_per_point(curve: Curve) -> int:
    """Counted FLOPs of one point: BatchNorm recomputed on the training split, then both splits evaluated."""
    train, test = curve.train[0].shape[0], curve.test[0].shape[0]
    return forward_flops(curve.models[0], curve.train[0][:1]).per_point(evaluated=train + test, batchnorm_samples=train)


def run(quick: bool = False) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    curve = prepare(size)
    ours, peer, index = contenders(curve, size)
    agreement = check(ours.run(), peer.run(), index)
    medians = interleaved_medians([ours, peer, gemm_contender()], size.repeats)
    total = ours.total_points
    row = Row(WORKLOAD, f"Bezier, {total} points, CNN+BN, BN recomputed (batches of {BATCH})", total, medians["ours"],
              peer_times([peer], medians, {peer.name: agreement}), target=f"≥ {TARGET_RATIO:g}× the reference, ≤ 1e-4")
    row.met = target_met(row.ratio, TARGET_RATIO, row.checks_ok)
    rate = GEMM_FLOPS / medians[GEMM_NAME]
    work = flops_per_point(curve) * total
    row.ceiling = (f"ours {work / row.ours_s / rate:.2f}, reference {work / row.peers[0].seconds / rate:.2f} "
                   f"of fp32 GEMM ({rate / 1e9:.0f} GFLOP/s)")
    return [row.to_dict()]
