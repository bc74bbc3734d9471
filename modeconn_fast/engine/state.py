"""What every layer of a subspace view needs to know about the forward pass in flight.

Activations carry the point axis folded into the batch axis: a tensor of the user's model with batch N becomes
[P·N, ...] in the view, point-major. Element-wise layers, pooling, flatten and reshapes by `x.size(0)` work
unchanged; the view's own layers unfold it to [P, ...] where the weights differ per point. (A forward that
moves or mixes the batch axis is detected by the view, which then runs the whole model per point.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Literal

from torch import Tensor

# "stored": mix the members' running statistics; "collect": normalise each point's batch with its own statistics
# and accumulate them (recomputation); "recomputed": use the accumulated ones; "batch": train mode, each point's
# batch normalised with its own statistics, nothing accumulated (training through the view).
BatchNormPhase = Literal["stored", "collect", "recomputed", "batch"]


@dataclass(frozen=True)
class Lookup:
    """An Embedding's output in the forward in flight: output[p·N + n, ...] = (Σ_k c[p,k] table_k)[indices[p·N + n, ...]]."""

    output: Tensor
    version: int  # output._version when recorded
    indices: Tensor  # [P·N, ...], the output's leading shape
    table: Tensor  # [K, V, D]: the Embedding's stacked weights


@dataclass
class ViewState:
    """Shared by a view and its layers; the view fills it before each forward."""

    coeffs: Tensor | None = None  # [P, K]: the points of this forward
    offset: int = 0  # index of its first point among all the points being evaluated
    samples: int = 0  # N, the batch size of the user's model
    shared_inputs: list[tuple[int, int, int]] = field(default_factory=list)  # (data_ptr, numel, version) per input
    lookups: list[Lookup] = field(default_factory=list)  # the Embeddings' outputs of this forward (evaluation only)
    records_lookups: bool = False  # set by a layer that reads `lookups` (recurrent, encoder layers); else none are kept
    batch: Hashable | None = None  # names the batch of this forward; layers may keep results per batch
    sources: tuple[Tensor, ...] = ()  # the caller's inputs of this forward (before they are repeated for the points)
    bn_phase: BatchNormPhase = "stored"
    plain: bool = False  # run every layer's plain path (the reference of the fast ones, e.g. `conv_block.py`)
    collected: int = 0  # BatchNorm statistics accumulated so far in this forward (recomputation)
    collections_per_forward: int | None = None  # how many a whole forward accumulates, once known
    metric_tail: Any = None  # a `conv_metrics.ConvMetrics` taking this forward's last block to the metrics, or None

    @property
    def points(self) -> int:
        return 0 if self.coeffs is None else self.coeffs.shape[0]

    @property
    def where(self) -> slice:
        """The points in flight among all the points being evaluated."""
        return slice(self.offset, self.offset + self.points)

    def per_point(self, x: Tensor) -> Tensor:
        """[P·M, *rest] -> [P, M, *rest] (M is N, or N times the positions a model folded into its batch)."""
        return x.reshape(self.points, -1, *x.shape[1:])

    def shared_rows(self, x: Tensor) -> tuple[int, Tensor] | None:
        """If x is (a reshape of) input i repeated for every point: (i, the N rows of one copy), else None.

        A layer fed the model's input directly can then compute x @ W_kᵀ once per basis tensor and mix
        the K results per point, instead of once per point.
        """
        if x.dim() == 0 or x.shape[0] != self.points * self.samples or not x.is_contiguous():
            return None
        identity = (x.data_ptr(), x.numel(), x._version)
        if identity in self.shared_inputs:
            return self.shared_inputs.index(identity), x[: self.samples]
        return None

    def lookup_of(self, x: Tensor) -> Lookup | None:
        """The Embedding lookup whose output x is (the same memory, shape and strides, unchanged since), or None."""
        for lookup in self.lookups:
            out = lookup.output
            if (x.data_ptr() == out.data_ptr() and x.shape == out.shape and x.stride() == out.stride()
                    and x.dtype == out.dtype and x._version == lookup.version):
                return lookup
        return None
