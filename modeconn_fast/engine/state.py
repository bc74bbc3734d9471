"""What every layer of a subspace view needs to know about the forward pass in flight.

Activations carry the point axis folded into the batch axis: a tensor of the user's model with batch N becomes
[P·N, ...] in the view, point-major. Element-wise layers, pooling, flatten and reshapes by `x.size(0)` work
unchanged; the view's own layers unfold it to [P, N, ...] where the weights differ per point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

BatchNormPhase = Literal["stored", "collect", "recomputed"]


@dataclass
class ViewState:
    """Shared by a view and its layers; the view fills it before each forward."""

    coeffs: Tensor | None = None  # [P, K]: the points of this forward
    offset: int = 0  # index of its first point among all the points being evaluated
    samples: int = 0  # N, the batch size of the user's model
    shared_inputs: list[tuple[int, int, int]] = field(default_factory=list)  # (data_ptr, numel, version)
    inputs: tuple[Tensor, ...] = ()  # the inputs of this forward, as given
    input_key: tuple = ()  # identifies them: storage, shape, strides, version
    bn_phase: BatchNormPhase = "stored"

    @property
    def points(self) -> int:
        return 0 if self.coeffs is None else self.coeffs.shape[0]

    @property
    def where(self) -> slice:
        """The points in flight among all the points being evaluated."""
        return slice(self.offset, self.offset + self.points)

    def unfold(self, x: Tensor) -> Tensor:
        """[P·N, *rest] -> [P, N, *rest]."""
        return x.reshape(self.points, self.samples, *x.shape[1:])

    def shared_rows(self, x: Tensor) -> Tensor | None:
        """If x is (a reshape of) an input repeated for every point, the N rows of one copy, else None.

        A layer fed the model's input directly can then compute x @ W_kᵀ once per basis tensor and mix
        the K results per point, instead of once per point.
        """
        if x.dim() == 0 or x.shape[0] != self.points * self.samples or not x.is_contiguous():
            return None
        if (x.data_ptr(), x.numel(), x._version) in self.shared_inputs:
            return x[: self.samples]
        return None
