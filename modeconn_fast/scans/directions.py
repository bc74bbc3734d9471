"""Random directions in weight space, normalised per filter or per layer (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets").

A direction d has one Gaussian tensor per parameter (never uniform). With normalization="filter", every
output filter (slice d[i] along dim 0) is rescaled to the norm of the weight's own filter:

    d[i] ← d[i] · ‖θ[i]‖ / ‖d[i]‖

"layer" rescales the whole tensor, d ← d · ‖θ‖ / ‖d‖; None keeps the raw Gaussian. With ignore="biasbn",
1-d parameters (biases, norm scales and shifts) get a zero direction; with ignore=None they are normalised
like the rest (for a 1-d tensor each filter is one number, so "filter" gives ±|θ_i|). Buffers (BatchNorm
running statistics) always get a zero direction: moving along d keeps them as they are.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["filter", "layer"] | None
Ignore = Literal["biasbn"] | None
NORMALIZATIONS = ("filter", "layer", None)
IGNORES = ("biasbn", None)


def check_direction_options(normalization: object, ignore: object) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be 'filter', 'layer' or None, got {normalization!r}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")


def random_direction(state: dict[str, Tensor], parameters: set[str], generator: torch.Generator, *,
                     normalization: Normalization = "filter", ignore: Ignore = "biasbn") -> dict[str, Tensor]:
    """One direction: a tensor like every floating entry of `state` (zero for buffers and ignored parameters).

    Gaussian values are drawn on the CPU from `generator` for every parameter, in the state dict's order
    (ignored ones too, so that `ignore` does not change the other parameters' directions), then normalised.
    """
    check_direction_options(normalization, ignore)
    direction = {}
    for name, weight in state.items():
        if not torch.is_floating_point(weight):
            continue
        if name not in parameters:
            direction[name] = torch.zeros_like(weight)
            continue
        drawn = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        if ignore == "biasbn" and weight.dim() <= 1:
            direction[name] = torch.zeros_like(weight)
            continue
        direction[name] = _normalised(drawn, weight.detach().cpu().double(), normalization).to(weight.device, weight.dtype)
    return direction


def _normalised(drawn: Tensor, weight: Tensor, normalization: Normalization) -> Tensor:
    if normalization is None:
        return drawn
    if normalization == "layer" or weight.dim() == 0:
        return drawn * _ratio(weight.norm(), drawn.norm())
    rows = weight.shape[0]
    weight_norms = weight.reshape(rows, -1).norm(dim=1)
    drawn_norms = drawn.reshape(rows, -1).norm(dim=1)
    return drawn * _ratio(weight_norms, drawn_norms).reshape(rows, *[1] * (weight.dim() - 1))


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a filter of zeros drawn: nothing to scale)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny),
                       torch.zeros_like(numerator))
