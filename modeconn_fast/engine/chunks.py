"""Chunks of points: how many run at once (under a memory budget, for the cache) and how they are run."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from .batches import Batches, move
from .view import SubspaceView

CPU_MEMORY_BUDGET = 1 << 30  # bytes
CPU_CACHE_BYTES = 2 << 20  # on CPU, chunks whose largest activation stays near this size run fastest (cache)
CPU_MIN_CHUNK = 16
CPU_MIN_ROWS = 128
WEIGHT_AMORTISATION = 4  # rows per batch: at least this many times a point's combined weight in activations
GPU_MEMORY_FRACTION = 0.25


class ChunkRunner:
    """Runs the chunks of points of one batch. On CPU with several torch threads, one worker thread per torch
    thread, each running its chunks with one intra-op thread: the many small operations of a chunk then run
    side by side instead of each being split across threads. Each chunk writes only its own points' results,
    so the order does not change them."""

    def __init__(self, device: torch.device):
        self.threads = torch.get_num_threads()
        self.workers = self.threads if device.type == "cpu" else 1
        self.pool: ThreadPoolExecutor | None = None

    def plan(self, points: int, chunk: int) -> int:
        """Even chunks of at most `chunk` points, at least one per worker where there are enough points;
        one worker (with all torch threads) where there is a single chunk."""
        count = max(-(-points // chunk), min(self.workers, points))
        if count == 1:
            self.workers = 1
        return -(-points // count)

    def __enter__(self) -> "ChunkRunner":
        if self.workers > 1:
            torch.set_num_threads(1)
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="modeconn-chunk")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            torch.set_num_threads(self.threads)

    def __call__(self, task: Callable[[int], None], starts: range) -> None:
        if self.pool is None or len(starts) == 1:
            for start in starts:
                task(start)
            return
        for future in [self.pool.submit(task, start) for start in starts]:
            future.result()


def plan_chunks(view: SubspaceView, coeffs: Tensor, datasets: list[Batches], bn_batches: Batches | None,
                memory_budget: int | None, device: torch.device, workers: int = 1) -> int:
    """Points per chunk, and rows per batch of the tensor datasets, so that the chunks in flight (one per
    worker) fit the budget.

    On CPU both are also sized for the chunk's largest activation to stay near CPU_CACHE_BYTES, with at least
    CPU_MIN_CHUNK points (a first layer fed the shared input then mixes many points at once) and
    CPU_MIN_ROWS rows (products stay efficient), and enough rows that the activations outweigh the combined
    weights made for every batch (WEIGHT_AMORTISATION). Given batches (iterables, and `bn_data`, whose batches
    define the recomputed statistics) are never split; `bn_data` given as tensors is one batch, split
    evenly only where one batch would not fit the budget.
    """
    whole_budget = memory_budget if memory_budget is not None else _default_budget(device)
    budget = whole_budget // workers
    per_sample = view.activation_bytes_per_sample(coeffs, move(datasets[0].first[0], device))
    per_point_weights = view.materialised_bytes_per_point()
    working_set = 4  # the largest activation, its input, and temporaries
    cpu = device.type == "cpu"
    for source in datasets:
        if source.rows is not None:
            fitting = budget // (2 * working_set * per_sample)
            if cpu:
                fitting = min(fitting, max(CPU_MIN_ROWS, CPU_CACHE_BYTES // (CPU_MIN_CHUNK * per_sample),
                                           WEIGHT_AMORTISATION * per_point_weights // per_sample))
            source.batch_size = max(2, min(source.rows, fitting))
    if bn_batches is not None and bn_batches.rows is not None:  # one batch (population statistics) if it fits
        bn_batches.batch_size = max(2, min(bn_batches.rows, whole_budget // (working_set * per_sample)))
    sources = [*datasets, *([bn_batches] if bn_batches is not None else [])]
    rows = max(_batch_rows(source) for source in sources)
    chunk = budget // (rows * per_sample * working_set + per_point_weights)
    if cpu:
        chunk = min(chunk, max(CPU_MIN_CHUNK, CPU_CACHE_BYTES // (rows * per_sample)))
    return int(max(1, min(coeffs.shape[0], chunk)))


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
