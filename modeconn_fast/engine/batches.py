"""Data for the engine: a tuple `(inputs, targets)` of tensors, or any re-iterable of such batches.
(`bn_data` may also give inputs alone: a tensor, or batches that are tensors or 1-tuples of one; a list of
tensors is always batches of inputs there, never an (inputs, targets) pair.)"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

Inputs = Tensor | tuple[Tensor, ...]
Batch = tuple[Inputs, Tensor]


def _is_tensors(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, (tuple, list)) and len(value) > 0
                                         and all(isinstance(v, Tensor) for v in value))


def _rows(inputs: Inputs) -> int:
    return (inputs if isinstance(inputs, Tensor) else inputs[0]).shape[0]


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    return inputs[start:stop] if isinstance(inputs, Tensor) else tuple(x[start:stop] for x in inputs)


def _rows_at(inputs: Tensor, rows: Tensor, start: int) -> bool:
    """Whether `rows` is inputs[start:start + len(rows)] (the same memory, dtype and strides)."""
    return (rows.dtype == inputs.dtype and rows.device == inputs.device and rows.shape[1:] == inputs.shape[1:]
            and rows.stride() == inputs.stride() and start + rows.shape[0] <= inputs.shape[0]
            and rows.untyped_storage().data_ptr() == inputs.untyped_storage().data_ptr()
            and rows.storage_offset() == inputs.storage_offset() + start * inputs.stride(0))


def move(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    return tuple(x.to(device, non_blocking=True) for x in inputs)


class Batches:
    """Batches of `(inputs, targets)`, iterable any number of times.

    `Batches(data)` takes a tuple of tensors (split evenly into batches of at most `batch_size` rows, all rows by
    default) or an iterable of batches such as a DataLoader (a one-shot iterator is read into memory once).
    """

    def __init__(self, data: Any, what: str = "data", *, targets_optional: bool = False):
        self.what = what
        self.targets_optional = targets_optional
        self.tensors: tuple[Inputs, Tensor] | None = None
        self.iterable: Iterable[Batch] | None = None
        self.batch_size: int | None = None
        self.bounds: list[int] | None = None  # row bounds of the batches where set by `align_with`
        if targets_optional and isinstance(data, Tensor):  # inputs alone (bn_data)
            data = (data, torch.zeros(data.shape[0], dtype=torch.long, device=data.device))
        batches_of_inputs = targets_optional and isinstance(data, list) and all(isinstance(x, Tensor) for x in data)
        if (not batches_of_inputs and isinstance(data, (tuple, list)) and len(data) == 2 and _is_tensors(data[0])
                and isinstance(data[1], Tensor)):
            inputs = data[0] if isinstance(data[0], Tensor) else tuple(data[0])
            rows = {x.shape[0] for x in ((inputs,) if isinstance(inputs, Tensor) else inputs)}
            if len(rows) != 1 or rows != {data[1].shape[0]}:
                raise ValueError(f"{what}: inputs and targets have different numbers of rows "
                                 f"({sorted(rows)} vs {data[1].shape[0]})")
            if data[1].shape[0] == 0:
                raise ValueError(f"{what} is empty: it has no rows")
            self.tensors = (inputs, data[1])
        elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str)):
            self.iterable = list(data) if iter(data) is data else data
        else:
            raise TypeError(f"{what} must be a tuple (inputs, targets) of tensors or an iterable of such batches "
                            f"(a DataLoader), got {type(data).__name__}")
        self.first = self._first_batch()

    @property
    def rows(self) -> int | None:
        """Rows in all, when the data is a tuple of tensors."""
        return None if self.tensors is None else self.tensors[1].shape[0]

    def __len__(self) -> int:
        if self.bounds is not None:
            return len(self.bounds) - 1
        if self.tensors is not None:
            return -(-self.rows // (self.batch_size or self.rows))
        return len(self.iterable)  # type: ignore[arg-type]

    def has_length(self) -> bool:
        return self.tensors is not None or hasattr(self.iterable, "__len__")

    def __iter__(self) -> Iterator[Batch]:
        if self.tensors is not None:  # len(self) batches of sizes that differ by at most one row
            inputs, targets = self.tensors
            count = len(self)
            bounds = self.bounds or [i * self.rows // count for i in range(count + 1)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                yield _slice(inputs, start, stop), targets[start:stop]
            return
        for batch in self.iterable:  # type: ignore[union-attr]
            if self.targets_optional and isinstance(batch, (tuple, list)) and len(batch) == 1:
                batch = batch[0]  # e.g. a DataLoader over TensorDataset(inputs)
            if self.targets_optional and isinstance(batch, Tensor):
                batch = (batch, torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device))
            yield _check_batch(batch, self.what)

    def align_with(self, other: "Batches") -> None:
        """Split this data as `other`'s batches where those are, in order, consecutive row slices of its inputs
        tensor that cover it (BatchNorm recomputed on batches of the training split, then that split evaluated):
        the same rows then make the same batches, and layers reuse what they computed for them
        (`SubspaceLayer.per_basis_outputs`). Elsewhere nothing changes."""
        if self.tensors is None or not isinstance(self.tensors[0], Tensor) or not isinstance(other.iterable, Sequence):
            return
        inputs, bounds = self.tensors[0], [0]
        for batch, _ in other:
            if not (isinstance(batch, Tensor) and _rows_at(inputs, batch, bounds[-1])):
                return
            bounds.append(bounds[-1] + batch.shape[0])
        if bounds[-1] == self.rows:
            self.bounds = bounds

    def _first_batch(self) -> Batch:
        for batch in self:
            return batch
        raise ValueError(f"{self.what} is empty: it gave no batch")


def _check_batch(batch: Any, what: str) -> Batch:
    if not (isinstance(batch, Sequence) and len(batch) == 2 and _is_tensors(batch[0]) and isinstance(batch[1], Tensor)):
        raise TypeError(f"each batch of {what} must be (inputs, targets) tensors, got {type(batch).__name__}"
                        + (f" of {len(batch)} items" if isinstance(batch, Sequence) else "")
                        + "; several inputs go as ((x1, x2), targets)")
    inputs = batch[0] if isinstance(batch[0], Tensor) else tuple(batch[0])
    if _rows(inputs) != batch[1].shape[0]:
        raise ValueError(f"a batch of {what} has {_rows(inputs)} input rows but {batch[1].shape[0]} targets")
    if _rows(inputs) == 0:
        raise ValueError(f"{what} gave an empty batch")
    return inputs, batch[1]
