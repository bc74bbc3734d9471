"""The plain loop: per point, mix the weights, `load_state_dict` into one model, forward, loss."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mixed_state(members: Sequence[Mapping[str, Tensor]], row: Tensor) -> dict[str, Tensor]:
    """Σ_k row[k] · members[k], entry by entry."""
    weights = row.tolist()
    return {name: sum(w * m[name] for w, m in zip(weights, members)) for name in members[0]}


def loop_losses(model: nn.Module, members: Sequence[Mapping[str, Tensor]], coeffs: Tensor, inputs: Tensor,
                targets: Tensor) -> Tensor:
    """Mean cross-entropy at each row of `coeffs`, one forward per point."""
    net = copy.deepcopy(model).eval()
    out = torch.empty(coeffs.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for p, row in enumerate(coeffs):
            net.load_state_dict(mixed_state(members, row))
            out[p] = F.cross_entropy(net(inputs), targets).item()
    return out
