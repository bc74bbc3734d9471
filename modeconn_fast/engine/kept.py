"""Values made from the points in flight and a layer's stacked tensors, kept from batch to batch.

In evaluation the view runs batch after batch over the same chunk of points: what depends only on the points'
coefficients and the basis (combined kernels, padded combined weights, BatchNorm's affine map) need not be made
again for every batch. `KeptPerChunk` keeps such values per chunk of points (the state's offset) while the
coefficients and the tensors they were made from stay the same.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from .state import ViewState

KEPT_ENTRIES = 32  # values kept per layer at most, the oldest dropped first
# Combined weights are kept up to this size per chunk of points; larger ones are made for each batch (one layer's at a
# time, as the chunk planner counts them).
KEPT_BYTES = 1 << 20


class KeptPerChunk(dict):
    """{(name, offset): (key, held tensors, coefficients, value)}; `get_or_make` reads and fills it."""

    def get_or_make(self, name: str, state: ViewState, held: tuple[Tensor, ...], make: Callable[[], Any]) -> Any:
        """make(), a function of the points in flight and of `held` only, kept per chunk of points while they stay
        the same (evaluation: the next batch reuses it): the same coefficient memory, and the same tensor objects,
        each unchanged since. The coefficients are held with the value, so no other tensor can take their memory
        while the key names it. At most KEPT_ENTRIES values, the oldest dropped first."""
        coeffs = state.coeffs
        key = (coeffs.data_ptr(), coeffs.shape, coeffs.stride(), coeffs.dtype, coeffs._version, state.bn_phase,
               *(t._version for t in held))
        entry = dict.get(self, (name, state.offset))
        if entry is None or entry[0] != key or len(entry[1]) != len(held) or any(a is not b for a, b in zip(entry[1], held)):
            self.pop((name, state.offset), None)
            if len(self) >= KEPT_ENTRIES:
                self.pop(next(iter(self)))
            entry = (key, held, coeffs, make())
            self[(name, state.offset)] = entry
        return entry[3]
