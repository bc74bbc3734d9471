"""Chunks of points: how many run at once, under a memory budget and, on CPU, sized for the cache."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..memory import KEEP_MMAP
from .batches import Batches, move
from .view import SubspaceView

CPU_MEMORY_BUDGET = 1 << 30  # bytes
CPU_CACHE_BYTES = 2 << 20  # on CPU, chunks whose largest activation stays near this size run fastest (cache)
CPU_MIN_CHUNK = 16
CPU_MIN_ROWS = 128
WEIGHT_AMORTISATION = 4  # rows per batch: at least this many times a point's combined weight in activations
GPU_MEMORY_FRACTION = 0.25


def plan_chunks(view: SubspaceView, coeffs: Tensor, datasets: list[Batches], bn_batches: Batches | None,
                memory_budget: int | None, device: torch.device, lanes: int = 1) -> list[slice]:
    """Chunks of points (of even sizes, a multiple of `lanes` of them: see `lanes.py`), and rows per batch of the
    tensor datasets, so that one chunk fits the budget (one chunk per lane: each the budget's share).

    On CPU both are also sized for the chunk's largest activation to stay near CPU_CACHE_BYTES, with at least
    CPU_MIN_CHUNK points (a first layer fed the shared input then mixes many points at once; fewer where their
    activations would outgrow the allocator's heap blocks) and
    CPU_MIN_ROWS rows (products stay efficient), and enough rows that the activations outweigh the combined
    weights made for every batch (WEIGHT_AMORTISATION). Given batches (iterables, and `bn_data`, whose batches
    define the recomputed statistics) are never split; `bn_data` given as tensors is one batch, split
    evenly only where one batch would not fit the budget. Neither is a tensor dataset where BatchNorm layers
    without running statistics normalise with each batch's own statistics: the results would depend on it.
    """
    budget = (memory_budget if memory_budget is not None else _default_budget(device)) // lanes  # a chunk per lane
    first_inputs = datasets[0].first[0]
    first_row = first_inputs[:1] if isinstance(first_inputs, Tensor) else tuple(x[:1] for x in first_inputs)
    per_sample = view.activation_bytes_per_sample(coeffs, move(first_row, device))
    per_point_weights = view.materialised_bytes_per_point()
    working_set = 4  # the largest activation, its input, and temporaries
    cpu = device.type == "cpu"
    whole_batches = view.has_batch_statistics()
    for source in datasets:
        if source.rows is not None and whole_batches:
            source.batch_size = source.rows
            if source.rows * per_sample * working_set > budget:
                warnings.warn("BatchNorm without running statistics normalises each batch with its own statistics, "
                              "and this dataset is larger than the memory budget: it is evaluated in one batch all "
                              "the same (pass it in batches of your choice to bound memory)", stacklevel=3)
        elif source.rows is not None:
            fitting = budget // (2 * working_set * per_sample)
            if cpu:
                fitting = min(fitting, max(CPU_MIN_ROWS, CPU_CACHE_BYTES // (CPU_MIN_CHUNK * per_sample),
                                           WEIGHT_AMORTISATION * per_point_weights // per_sample))
            source.batch_size = max(2, min(source.rows, fitting))
    if bn_batches is not None and bn_batches.rows is not None:  # one batch (population statistics) if it fits
        fitting = budget // (working_set * per_sample)
        bn_batches.batch_size = bn_batches.rows if whole_batches else max(2, min(bn_batches.rows, fitting))
    sources = [*datasets, *([bn_batches] if bn_batches is not None else [])]
    rows = max(_batch_rows(source) for source in sources)
    chunk = budget // (rows * per_sample * working_set + per_point_weights)
    if cpu:
        chunk = min(chunk, max(_cpu_min_chunk(rows * per_sample), CPU_CACHE_BYTES // (rows * per_sample)))
    points = coeffs.shape[0]
    count = -(-points // int(max(1, min(points, chunk))))
    count = min(points, -(-count // lanes) * lanes)
    bounds = [i * points // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _cpu_min_chunk(point_bytes: int) -> int:
    """CPU_MIN_CHUNK points, fewer where their largest activation would exceed the largest block glibc serves
    from its heap (KEEP_MMAP): larger blocks are fresh mmap pages, page-faulted anew in every chunk (B2 at 16
    points per chunk, 59 MB activations: 21 ms a point; at 8 points: 14 ms, one thread)."""
    return max(1, min(CPU_MIN_CHUNK, KEEP_MMAP // point_bytes))


def _batch_rows(batches: Batches) -> int:
    if batches.rows is not None:
        return min(batches.rows, batches.batch_size or batches.rows)
    inputs = batches.first[0]
    return (inputs if isinstance(inputs, Tensor) else inputs[0]).shape[0]


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_FRACTION)
    return CPU_MEMORY_BUDGET
