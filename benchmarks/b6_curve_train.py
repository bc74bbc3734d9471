"""B6 curve-train: `train_curve` on a quadratic Bezier curve between two trained models of B3's CNN with
BatchNorm, 20 steps of 128 samples, against a port of the 2018 reference's curve training
(`peers/reference_curve_training.py`: per-layer curve modules computing W(t) in every forward).

Both see the same minibatches (drawn once from a seeded generator) and the same t values (the same seeded
generator, one draw per step), so their losses must agree step by step (≤ 1e-4). A second row times
t_per_step = 8 (eight t per minibatch in one pass of the view) against t_per_step = 1. Each side trains a copy of the
same untrained curve, made before its timer starts (the copy is the benchmark's, not part of either's training).
The ceiling column counts the multiply-adds of the convolutions and linear layers (forward, and twice that for
backward) of the steps' points and divides by the fp32 GEMM rate measured in this run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import modeconn_fast
from modeconn_fast.digits import load_digits_split, train_classifier

from .b3_curve_bn import cnn
from .harness import (Check, Contender, PeerTime, Row, compare, gemm_rate, interleaved_medians, peer_times,
                      target_met, threads)
from .peers.reference_curve_training import CurveNet, train_steps

WORKLOAD = "B6 curve-train"
STEPS, BATCH = 20, 128
LR, MOMENTUM, WEIGHT_DECAY, SEED = 0.05, 0.9, 5e-4, 0
ATOL = 1e-4


@dataclass(frozen=True)
class Size:
    repeats: int
    epochs: int  # of the two end models' training


FULL = Size(repeats=5, epochs=10)
QUICK = Size(repeats=9, epochs=3)


@dataclass
class Setup:
    curve: modeconn_fast.BezierCurve  # the untrained curve every run starts from
    batches: list[tuple[Tensor, Tensor]]


def prepare(size: Size) -> Setup:
    digits = load_digits_split()
    inputs, targets = digits.train[0].reshape(-1, 1, 8, 8), digits.train[1]
    with threads(1):
        a, b = (train_classifier(cnn(s), (inputs, targets), epochs=size.epochs, seed=s, progress=False) for s in (0, 1))
    generator = torch.Generator().manual_seed(SEED)
    rows = [torch.randperm(len(targets), generator=generator)[:BATCH] for _ in range(STEPS)]
    return Setup(modeconn_fast.BezierCurve(a, b), [(inputs[r], targets[r]) for r in rows])


def ours(curve: modeconn_fast.BezierCurve, setup: Setup, t_per_step: int) -> list[float]:
    history = modeconn_fast.train_curve(curve, setup.batches, epochs=1, lr=LR, momentum=MOMENTUM,
                                        weight_decay=WEIGHT_DECAY, t_per_step=t_per_step, schedule="constant",
                                        seed=SEED, progress=False)
    return history.step_loss


def reference(points: list[nn.Module], setup: Setup) -> list[float]:
    net = CurveNet(points, fixed=[True, False, True])
    return train_steps(net, setup.batches, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, seed=SEED)


def fresh_curve(setup: Setup) -> modeconn_fast.BezierCurve:
    """The untrained curve, copied (before the timer: both sides train from a copy of the same start)."""
    return copy.deepcopy(setup.curve)


def fresh_points(setup: Setup) -> list[nn.Module]:
    """The untrained curve's control points, copied, for the reference."""
    return [copy.deepcopy(p) for p in setup.curve.control_points]


def multiply_adds(model: nn.Module, inputs: Tensor) -> int:
    """Multiply-adds of the Conv2d and Linear layers of one forward of `model` on `inputs`."""
    total = [0]

    def count(module: nn.Module, _args: Any, out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            total[0] += out.numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    return total[0]


def floor_seconds(setup: Setup, t_per_step: int, rate: float) -> float:
    """Forward + backward FLOPs of all steps (3 × 2 × multiply-adds per point) ÷ the GEMM rate."""
    per_point = multiply_adds(setup.curve.architecture, setup.batches[0][0])
    return 6 * per_point * t_per_step * STEPS / rate


def run(quick: bool = False) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    setup = prepare(size)
    agreement: Check = compare(torch.tensor(ours(fresh_curve(setup), setup, 1)),
                               torch.tensor(reference(fresh_points(setup), setup)), atol=ATOL)
    contenders = [Contender("ours", lambda curve: ours(curve, setup, 1), STEPS, STEPS, lambda: fresh_curve(setup)),
                  Contender("ours t8", lambda curve: ours(curve, setup, 8), STEPS, STEPS, lambda: fresh_curve(setup)),
                  Contender("2018 reference", lambda points: reference(points, setup), STEPS, STEPS,
                            lambda: fresh_points(setup))]
    medians = interleaved_medians(contenders, size.repeats)
    rate = gemm_rate()
    rows = []
    one = Row(WORKLOAD, f"Bezier, CNN+BN, {STEPS} steps × {BATCH} samples, t_per_step 1", STEPS, medians["ours"],
              peer_times(contenders[2:], medians, {"2018 reference": agreement}),
              ceiling=f"{floor_seconds(setup, 1, rate) / medians['ours']:.2f} of fp32 GEMM ({rate / 1e9:.0f} GFLOP/s)",
              target="≥ 1.0× the reference, losses ≤ 1e-4 step by step")
    one.met = target_met(one.ratio, 1.0, one.checks_ok)
    eight = Row(WORKLOAD, f"the same with t_per_step 8 (8 t per minibatch, one pass)", STEPS, medians["ours t8"],
                [PeerTime("ours at t_per_step 1", medians["ours"], STEPS, "—", True)],
                ceiling=f"{floor_seconds(setup, 8, rate) / medians['ours t8']:.2f} of fp32 GEMM",
                target="≤ 4× the time of t_per_step 1 (ratio ≥ 0.25)")
    eight.met = target_met(eight.ratio, 0.25, True)
    rows += [one.to_dict(), eight.to_dict()]
    return rows
