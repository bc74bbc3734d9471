"""`torch.func.vmap` over `torch.func.functional_call`: the point weights materialised in chunks of points."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap


class VmapPeer:
    """Per-point loss of `model` at weights Σ_k c[p,k] members[k], `chunk` points per vmap call."""

    def __init__(self, model: nn.Module, members: Sequence[Mapping[str, Tensor]], chunk: int):
        self.model = model.eval()
        self.stacked = {name: torch.stack([m[name] for m in members]) for name in members[0]}
        self.chunk = chunk

    def losses(self, coeffs: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        def loss_at(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(self.model, params, (inputs,)), targets)

        out = []
        with torch.no_grad():
            for rows in coeffs.split(self.chunk):
                params = {n: torch.tensordot(rows, t, dims=1) for n, t in self.stacked.items()}
                out.append(vmap(loss_at)(params))
        return torch.cat(out).double()
