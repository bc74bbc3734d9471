"""What identifies a scan: plain-data descriptions and SHA-256 hashes of its subspace, grid, data and model.

A stored scan is resumed only when every field of its fingerprint equals the new call's; the fields that
differ are named in the error.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..subspace import Basis


def _update(digest: "hashlib._Hash", tensor: Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def states_sha256(*states: Mapping[str, Tensor]) -> str:
    """Hash of the tensors of each mapping in turn, by name (name, dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for state in states:
        for name in sorted(state):
            digest.update(name.encode())
            _update(digest, state[name])
    return digest.hexdigest()


def basis_sha256(basis: Basis) -> str:
    """Hash of every stacked basis tensor and constant, by name."""
    return states_sha256(basis.stacked, basis.constants)


def array_summary(values: np.ndarray) -> dict[str, Any]:
    """A grid axis: its length, ends and a hash of its float64 values."""
    return {"n": int(values.size), "first": float(values[0]), "last": float(values[-1]),
            "sha256": hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()}


def describe_data(data: Any) -> dict[str, Any] | None:
    """Shapes, dtypes and a hash of every tensor of `data` (tensors, tuples, dicts or an iterable of batches,
    read once). None for no data.

    An iterable of batches (a DataLoader) is hashed sample by sample and the samples' hashes are summed, so
    the hash does not depend on their order: a shuffled loader gives the same fingerprint on every pass and
    its scan can be resumed (its metrics are means over the same samples)."""
    if data is None:
        return None
    digest = hashlib.sha256()
    shapes: list[str] = []
    sample_sum = 0

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            _update(digest, value)
            shapes.append(_shape(value))
        elif isinstance(value, Mapping):
            for key in value:
                digest.update(str(key).encode())
                visit(value[key])
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            nonlocal sample_sum
            for batch in value:  # a DataLoader
                sample_sum = (sample_sum + _samples_hash_sum(batch, shapes)) % 2 ** 256
            digest.update(sample_sum.to_bytes(32, "big"))
        else:
            raise TypeError(f"data holds a {type(value).__name__}: only tensors, tuples, dicts and iterables of them "
                            "can be fingerprinted")

    visit(data)
    kind = "dict" if isinstance(data, Mapping) else "tensors" if isinstance(data, (tuple, list)) else type(data).__name__
    shapes = sorted(set(shapes), key=shapes.index) if kind not in ("dict", "tensors") else shapes
    summary = shapes if len(shapes) <= 8 else shapes[:8] + [f"... {len(shapes)} tensors in all"]
    return {"kind": kind, "tensors": summary, "sha256": digest.hexdigest()}


def _shape(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _samples_hash_sum(batch: Any, shapes: list[str]) -> int:
    """Sum of the SHA-256 hashes (as integers) of the samples of one batch: sample i is row i of every tensor
    in the batch, e.g. (inputs[i], targets[i])."""
    tensors = [batch] if isinstance(batch, Tensor) else list(batch.values()) if isinstance(batch, Mapping) \
        else list(batch) if isinstance(batch, (tuple, list)) else None
    if tensors is None or not all(isinstance(t, Tensor) and t.dim() > 0 for t in tensors) or \
            len({len(t) for t in tensors}) != 1:
        raise TypeError("each batch of an iterable must be a tensor, or a tuple or dict of tensors with one "
                        f"batch axis of the same length first; got {type(batch).__name__}")
    rows = [t.detach().cpu().contiguous() for t in tensors]
    shapes.extend(f"per sample {_shape(row[0])}" for row in rows)
    total = 0
    for i in range(len(rows[0])):
        sample = hashlib.sha256()
        for row in rows:
            _update(sample, row[i])
        total += int.from_bytes(sample.digest(), "big")
    return total


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The architecture: class, entry names, shapes and dtypes (not the weights: the basis holds those)."""
    digest = hashlib.sha256(repr(model).encode())
    state = model.state_dict()
    for name, tensor in state.items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "entries": len(state),
            "sha256": digest.hexdigest()}
