"""Layers of a subspace view: each holds its module's K stacked basis tensors and serves P points at once.

Input and output carry the point axis folded into the batch axis ([P·N, ...], see `state.py`). Weights of
point p are θ(p) = Σ_k c[p,k] θ_k (DESIGN §1); Linear and convolutions go through the fused ops of
`modeconn_fast.ops`, the normalisations mix only their small affine vectors.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import linear_cpu, ops, ops_torch
from .kept import KEPT_BYTES, KeptPerChunk
from .state import Lookup, ViewState

# Per-basis outputs of a layer kept for BatchNorm's batches on CPU up to this size (`SubspaceLayer.per_basis_outputs`).
PER_BASIS_KEPT_BYTES = 1 << 25


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on `module` itself: fused paths must then run it on its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class SubspaceLayer(nn.Module):
    """Base: a reference to the view's state and this module's stacked tensors (by local name)."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor]):
        super().__init__()
        self.state = state
        self.stacked = stacked
        self._cache: dict[tuple, tuple[Tensor | None, Tensor, bool]] = {}  # see `per_basis_outputs`

    def mixed(self, name: str) -> Tensor | None:
        """Σ_k c[p,k] θ_k[name] for the points in flight: [P, *shape], or None if the module has no such entry."""
        tensor = self.stacked.get(name)
        return None if tensor is None else ops.mix(self.state.coeffs.to(tensor.dtype), tensor)

    def materialised_bytes_per_point(self) -> int:
        """Memory that one point's combined weights may take while this layer runs."""
        return 0

    def mixed_per_basis(self, shared: tuple[int, Tensor], per_basis: Callable[[Tensor], Tensor]) -> Tensor | None:
        """For input i shared by all points: y[p] = Σ_k c[p,k] Y_k with Y_k = layer_k(shared rows), the K outputs
        computed once per batch and kept while chunk after chunk of points runs over it (evaluation only).
        None where that does not apply (gradients recorded, or the batch not named by the caller)."""
        outputs = self.per_basis_outputs(shared, per_basis)
        return None if outputs is None else ops.mix(self.state.coeffs, outputs)

    def per_basis_outputs(self, shared: tuple[int, Tensor], per_basis: Callable[[Tensor], Tensor],
                          layout: str = "") -> Tensor | None:
        """The K outputs Y_k = per_basis(identity coefficients) of `mixed_per_basis`, kept per batch (and per
        `layout`, naming what per_basis arranges them in); None where they are not kept.

        On CPU they are kept per source rows (the caller's input tensor of that batch, held with them); those of
        BatchNorm's recomputation for several batches, up to PER_BASIS_KEPT_BYTES, so that the evaluation reuses
        them where its batches are the same rows (`Batches.align_with`); others for the last batch only."""
        state = self.state
        if torch.is_grad_enabled() or state.batch is None:
            return None
        index, rows = shared
        source = state.sources[index] if index < len(state.sources) and rows.device.type == "cpu" else None
        named = ((source.data_ptr(), source.shape, source.stride(), source.dtype, source._version)
                 if source is not None else (state.batch,))
        key = (*named, index, layout, tuple(rows.shape), *((t.data_ptr(), t._version) for t in self.stacked.values()))
        entry = self._cache.get(key)
        if entry is not None:
            self._cache[key] = self._cache.pop(key)  # the most recent last
            return entry[1]
        collecting = source is not None and state.bn_phase == "collect"
        for old in [old for old, entry in self._cache.items() if not entry[2]]:
            del self._cache[old]  # free the old outputs first (those of BatchNorm's batches aside)
        outputs = per_basis(torch.eye(state.coeffs.shape[1], dtype=rows.dtype, device=rows.device))
        if collecting:
            kept = outputs.numel() * outputs.element_size()
            for old in list(self._cache):
                if kept + sum(o.numel() * o.element_size() for _, o, _ in self._cache.values()) <= PER_BASIS_KEPT_BYTES:
                    break
                del self._cache[old]
        self._cache[key] = (source, outputs, collecting)  # the source held: its memory is not taken while keyed
        return outputs


class SubspaceLinear(SubspaceLayer):
    """y[p] = x[p] @ W(p)ᵀ + b(p) on inputs [P·N, ..., Din]."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.Linear):
        super().__init__(state, stacked)
        self.in_features, self.out_features = module.in_features, module.out_features
        self._kept = KeptPerChunk()  # see `_keeps_weights`

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        weight, bias = self.stacked["weight"], self.stacked.get("bias")
        shared = state.shared_rows(x)
        y = None
        if shared is not None:
            shared = (shared[0], shared[1].reshape(-1, self.in_features))
            rows = shared[1]
            if weight.shape[0] < self.in_features:  # mixing K outputs costs less than one product per point
                y = self.mixed_per_basis(shared, lambda eye: ops.combined_linear(rows, weight, bias, eye))
        if y is None:
            x_points = shared[1] if shared is not None else x.reshape(state.points, -1, self.in_features)
            if shared is None and self._keeps_weights(x):
                w, b = self._kept.get_or_make("combined weights", state, tuple(self.stacked.values()),
                                              lambda: ops_torch.combined_linear_weights(weight, bias, state.coeffs))
                y = ops_torch.linear_of_combined(x_points, w, b, self.out_features)
            else:
                with linear_cpu.plain_only(state.plain):
                    y = ops.combined_linear(x_points, weight, bias, state.coeffs)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _keeps_weights(self, x: Tensor) -> bool:
        """For per-point inputs in evaluation on CPU (not the plain mode), the points' combined (padded) weights are
        kept per chunk of points from batch to batch (`kept.py`, up to KEPT_BYTES) instead of mixed again for every
        batch (B3's last layer: the mix and the padding took about as long as its product)."""
        state, weight = self.state, self.stacked["weight"]
        padded = max(self.out_features, ops_torch.NARROW_OUTPUT) * self.in_features * weight.element_size()
        return (not torch.is_grad_enabled() and not state.plain and x.device.type == "cpu"
                and x.dtype == weight.dtype == state.coeffs.dtype and state.points * padded <= KEPT_BYTES)

    def materialised_bytes_per_point(self) -> int:
        return self.stacked["weight"][0].numel() * self.stacked["weight"].element_size()


class SubspaceConv(SubspaceLayer):
    """Conv1d / Conv2d with combined kernels on inputs [P·N, C, *spatial]."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.Conv1d | nn.Conv2d):
        super().__init__(state, stacked)
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding = module.padding
        self.padding_mode = module.padding_mode
        self.pre_padding = module._reversed_padding_repeated_twice if module.padding_mode != "zeros" else None

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        padding = self.padding
        if self.pre_padding is not None:  # as nn.Conv does for 'reflect', 'replicate' and 'circular'
            x = F.pad(x, self.pre_padding, mode=self.padding_mode)
            padding = 0
        weight, bias = self.stacked["weight"], self.stacked.get("bias")
        options = dict(stride=self.stride, padding=padding, dilation=self.dilation, groups=self.groups)
        shared = state.shared_rows(x)
        y = None
        if shared is not None and self.per_basis_is_cheaper():
            rows = shared[1]
            y = self.mixed_per_basis(shared, lambda eye: ops.combined_conv(rows, weight, bias, eye, **options))
        if y is None:
            x_points = shared[1] if shared is not None else state.per_point(x)
            y = ops.combined_conv(x_points, weight, bias, state.coeffs, **options)
        return y.reshape(-1, *y.shape[2:])

    def per_basis_is_cheaper(self) -> bool:
        """For a shared input: K convolutions then a mix, rather than one per point (K < C/groups · kernel size)."""
        weight = self.stacked["weight"]
        return weight.shape[0] < weight[0, 0].numel()

    def materialised_bytes_per_point(self) -> int:
        return self.stacked["weight"][0].numel() * self.stacked["weight"].element_size()


class SubspaceLayerNorm(SubspaceLayer):
    """LayerNorm over the trailing `normalized_shape`, with per-point affine weight and bias."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.LayerNorm):
        super().__init__(state, stacked)
        self.normalized_shape, self.eps = tuple(module.normalized_shape), module.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        weight, bias = self.mixed("weight"), self.mixed("bias")
        if weight is None and bias is None:
            return y
        points = self.state.points
        y = y.reshape(points, -1, *self.normalized_shape)
        if weight is not None and bias is not None:  # one pass; in place when no gradient is recorded
            recorded = torch.is_grad_enabled() and (y.requires_grad or weight.requires_grad or bias.requires_grad)
            y = torch.addcmul(bias.unsqueeze(1), y, weight.unsqueeze(1), **({} if recorded else {"out": y}))
        elif weight is not None:
            y = y * weight.unsqueeze(1)
        elif bias is not None:
            y = y + bias.unsqueeze(1)
        return y.reshape(x.shape)


class SubspaceEmbedding(SubspaceLayer):
    """Embedding lookup: out[p] = Σ_k c[p,k] W_k[idx[p]] (rows gathered first, then mixed)."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.Embedding):
        super().__init__(state, stacked)
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.padding_idx = module.padding_idx  # read by model code; it shapes only the gradient, not the forward

    def forward(self, idx: Tensor) -> Tensor:
        state, weight = self.state, self.stacked["weight"]
        shared = state.shared_rows(idx)
        if shared is not None:  # one gather for all points: [K, *idx, D], then mix
            y = ops.mix(state.coeffs, weight[:, shared[1]])
        else:  # per point: gather [K, P, M, D], then y[p] = Σ_k c[p,k] g[k, p]
            rows = weight[:, idx.reshape(state.points, -1)]
            y = torch.einsum("pk,kpmd->pmd", state.coeffs, rows)
        y = y.reshape(*idx.shape, self.embedding_dim)
        if state.records_lookups and not torch.is_grad_enabled() and not state.plain:  # for a recurrent layer
            state.lookups.append(Lookup(y, y._version, idx, weight))
        return y
