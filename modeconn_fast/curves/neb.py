"""AutoNEB (Draxler et al. 2018): a nudged elastic band between two minima, with pivots inserted where needed.

The band is a polygonal chain θ_A = θ_0, θ_1, …, θ_{K−1} = θ_B (a `PolyChain` whose control points are the
pivots; the ends stay fixed). Each step computes every pivot's minibatch loss L_k and gradient g_k in ONE pass
of the subspace view (one-hot coefficient rows, one point per pivot) and moves the inner pivots with SGD along

    g_k − (g_k·τ_k) τ_k  −  κ (‖θ_{k+1} − θ_k‖ − ‖θ_k − θ_{k−1}‖) τ_k

the loss gradient perpendicular to the band plus a spring along it that evens out the pivots' spacing. τ_k is
the upwind tangent of Henkelman & Jónsson (2000): towards the neighbour of higher loss, and at a local maximum
or minimum of the loss along the band a blend of both segments weighted by the loss differences.

AutoNEB runs cycles: after each, the loss is evaluated densely along the chain (`sub_points` points between
neighbouring pivots, all through `evaluate`); in the next cycle a pivot is inserted, in at most `insert`
segments, where the dense loss exceeds the straight interpolation of the two pivots' losses by more than
`threshold` times the range of the pivots' losses, at the worst such point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.batches import Batches, move
from ..engine.outputs import OutputSelector
from ..subspace import check_same_entries
from .evaluate import CurveResult, evaluate_curve
from .polychain import PolyChain
from .train import minibatches


@dataclass
class NEBResult:
    """`path`: the chain through the final pivots; `profile`: its dense loss (and error) profile on the training
    data; `saddle_loss`: the maximum of that profile; per cycle, `saddles` (the dense maximum) and `pivots`
    (the number of pivots, ends included)."""

    path: PolyChain
    profile: CurveResult
    saddle_loss: float
    saddles: list[float] = field(default_factory=list)
    pivots: list[int] = field(default_factory=list)


def autoneb(model_a: nn.Module, model_b: nn.Module, train_data: Any, *, pivots: int = 3, cycles: int = 4,
            steps: int = 100, lr: float = 0.02, momentum: float = 0.9, spring: float = 1.0, insert: int = 2,
            threshold: float = 0.1, sub_points: int = 9, batch_size: int = 128,
            loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, bn_data: Any = None, seed: int = 0,
            output: OutputSelector = None, progress: bool = True) -> NEBResult:
    """A low-loss path from model_a to model_b by AutoNEB (see the module docstring).

    pivots: inner pivots of the first cycle, evenly spaced on the straight line. cycles: NEB runs of `steps` SGD
    steps (learning rate `lr`, `momentum`) on minibatches of `batch_size` shuffled from `seed` (or the batches
    given), with pivot insertion before every cycle but the first. spring: κ. loss_fn: mean loss of outputs
    [B, ...] against targets (default cross-entropy). bn_data: batches to recompute BatchNorm statistics from when
    the dense profiles are evaluated (usually the training data). output: which part of a tuple, dict or
    dataclass output holds the logits, as in `evaluate` (the path keeps it). A band whose loss turns non-finite
    raises FloatingPointError at the end of that cycle (lower lr or momentum).

    The default lr held on every digits pair measured (`python -m benchmarks.autoneb_stability`: five pairs each of
    the 64-128-128-128-10 MLP and of a 2-conv CNN with BatchNorm, 4 cycles of 100 steps): final saddles ≤ 0.03 at
    0.02; at 0.05 two CNN bands rose past 2 after pivot insertions, at 0.1 two MLP bands diverged and every CNN
    band rose past 1. A saddle that rises from one cycle to the next (`saddles`) is that instability: lower lr.
    """
    _check_arguments(pivots, cycles, steps, lr, spring, insert, threshold, sub_points, batch_size)
    check_same_entries(model_a, model_b, "model_a", "model_b")
    data = Batches(train_data, "train_data")
    loss_fn = loss_fn or F.cross_entropy
    generator = torch.Generator().manual_seed(seed)
    chain = PolyChain(model_a, model_b, bends=pivots, output=output)
    saddles, counts = [], []
    profile = None
    batches = _endless(data, batch_size, generator)
    for cycle in tqdm(range(cycles), desc="AutoNEB", unit="cycle", disable=not progress, leave=False):
        if profile is not None:
            chain = _with_inserted_pivots(chain, model_a, model_b, profile.loss, sub_points, insert, threshold)
        free = [p for p in chain.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(free, lr=lr, momentum=momentum)
        chain.train()
        for _ in range(steps):
            inputs, targets = next(batches)
            optimizer.zero_grad()
            neb_step(chain, move(inputs, free[0].device), targets.to(free[0].device), loss_fn, spring)
            optimizer.step()
        chain.eval()
        profile = evaluate_curve(chain, train_data, points=(chain.size - 1) * (sub_points + 1) + 1, bn_data=bn_data,
                                 loss_fn=loss_fn, progress=False)
        if not torch.isfinite(profile.loss).all():
            raise FloatingPointError(
                f"AutoNEB diverged in cycle {cycle + 1}: the path's loss is not finite; lower lr (now {lr}) or "
                f"momentum (now {momentum})"
            )
        saddles.append(float(profile.loss.max()))
        counts.append(chain.size)
    return NEBResult(path=chain, profile=profile, saddle_loss=saddles[-1], saddles=saddles, pivots=counts)


def neb_step(chain: PolyChain, inputs: Any, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
             spring: float) -> Tensor:
    """Set the inner pivots' `.grad` to the NEB force (see the module docstring); returns the pivots' losses [K].
    All pivots run as points of one pass of the view."""
    stacked = chain.stacked()
    first = next(iter(stacked.values()))
    rows = torch.eye(chain.size, dtype=first.dtype, device=first.device)
    outputs = chain.outputs(inputs, rows, stacked)  # [K, B, ...]
    losses = torch.stack([loss_fn(out, targets) for out in outputs])
    losses.sum().backward()  # one-hot rows: pivot k's gradient is that of its own loss
    with torch.no_grad():
        flat = chain.flat_parameters(stacked)
        values = losses.detach()
        for k in range(1, chain.size - 1):
            parameters = list(chain.control_points[k].parameters())
            for p in parameters:  # a parameter the forward never used has no gradient: zero
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            gradient = torch.cat([p.grad.reshape(-1) for p in parameters])
            tangent = upwind_tangent(flat[k - 1], flat[k], flat[k + 1], values[k - 1:k + 2])
            gap = (flat[k + 1] - flat[k]).norm() - (flat[k] - flat[k - 1]).norm()
            force = gradient - (gradient @ tangent) * tangent - spring * gap * tangent
            for p, piece in zip(parameters, force.split([p.numel() for p in parameters])):
                p.grad.copy_(piece.view_as(p))
    return losses.detach()


def upwind_tangent(previous: Tensor, current: Tensor, following: Tensor, losses: Tensor) -> Tensor:
    """The unit tangent at `current` (Henkelman & Jónsson 2000); losses: those of the three pivots."""
    before, here, after = (float(v) for v in losses)
    back, forward = current - previous, following - current
    if (here > before and here > after) or (here < before and here < after):
        big, small = max(abs(here - before), abs(here - after)), min(abs(here - before), abs(here - after))
        tangent = small * back + big * forward if after > before else big * back + small * forward
    else:
        tangent = forward if after > before else back
    return tangent / tangent.norm().clamp_min(torch.finfo(tangent.dtype).tiny)


def _with_inserted_pivots(chain: PolyChain, model_a: nn.Module, model_b: nn.Module, dense: Tensor, sub_points: int,
                          insert: int, threshold: float) -> PolyChain:
    """A new chain with a pivot inserted at the worst dense point of the (at most `insert`) segments whose dense
    loss exceeds the interpolation of their ends' by more than threshold · (range of the pivots' losses)."""
    per_segment = dense[:-1].reshape(chain.size - 1, sub_points + 1)
    ends = dense[::sub_points + 1]
    alphas = torch.arange(sub_points + 1, dtype=dense.dtype) / (sub_points + 1)
    excess = per_segment - ((1 - alphas) * ends[:-1, None] + alphas * ends[1:, None])
    excess = excess / (float(ends.max() - ends.min()) + 1e-12)
    worst, where = excess.max(dim=1)
    chosen = [int(s) for s in worst.argsort(descending=True)[:insert] if float(worst[s]) > threshold]
    states = [point.state_dict() for point in chain.control_points]
    pivots = [states[0]]
    for segment in range(chain.size - 1):
        if segment in chosen:
            alpha = float(alphas[where[segment]])
            pivots.append({name: (1 - alpha) * value + alpha * states[segment + 1][name]
                           if torch.is_floating_point(value) else value.clone()
                           for name, value in states[segment].items()})
        pivots.append(states[segment + 1])
    new = PolyChain(model_a, model_b, bends=len(pivots) - 2, output=chain.output)
    for point, state in zip(new.control_points, pivots):
        point.load_state_dict(state)
    return new


def _endless(data: Batches, batch_size: int, generator: torch.Generator):
    """Minibatches epoch after epoch, each epoch reshuffled."""
    while True:
        yield from minibatches(data, batch_size, generator)


def _check_arguments(pivots: int, cycles: int, steps: int, lr: float, spring: float, insert: int, threshold: float,
                     sub_points: int, batch_size: int) -> None:
    for name, value, least in (("pivots", pivots, 1), ("cycles", cycles, 1), ("steps", steps, 1),
                               ("insert", insert, 0), ("sub_points", sub_points, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not spring >= 0:
        raise ValueError(f"spring (κ) must be ≥ 0, got {spring!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be ≥ 0, got {threshold!r}")
