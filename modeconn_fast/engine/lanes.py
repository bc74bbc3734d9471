"""Lanes: an evaluation's points split into contiguous shares, each run by its own Python thread on its share of the
intra-op threads (one each where there are as many lanes as threads; torch's and the compiled kernels'), over the
same stream of batches.

A chunk of a small CNN's points runs hundreds of small ops (convolutions grouped over points, compiled kernels,
Python between them). On T intra-op threads each op is split T ways and ends at a barrier: the ops are too small to
split well, and on a shared machine one descheduled thread stalls every barrier for a time slice. T lanes of one
thread each run whole chunks side by side instead: one lane's Python, kernels and convolutions overlap with the
other's (the kernels release the GIL), and nothing waits for another lane until the end.

Measured (B3, 2 threads, 2 cores shared with other jobs; fresh processes alternating, ours the median of 9 calls):
in one series at load 2.1-3.7, 11 points, lanes 103-175 ms against 171-1336 ms in one lane (ratio to the reference ≥
19.6 against ≥ 1.08); 61 points, in one process alternating, at load 4.2-7.6: 0.50-0.79 s against 1.75-4.49 s. On a
quiet machine they gain nothing at 61 points (181 against 181 ms: four chunks either way) and lose at 11 (about 62
against 45 ms: two lanes of 5-6 points run twice the forwards, each with its Python, where one lane runs one chunk
of 11).

Lanes share nothing mutable: each has its own subspace view (`SubspaceView.lane_copy`: the same model and basis
tensors, its own state, BatchNorm statistics and caches), its own chunks of points and metric sums, so a point's
numbers are those it gets in one lane with the same chunks, and the shares' results are joined in point order.
The calling thread reads every batch once and hands it to each lane in turn (to the others through bounded
queues); it runs the first lane itself.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Sequence, TypeVar

import torch

Item = TypeVar("Item")
QUEUED_BATCHES = 4  # batches a lane may lag behind the first one (bounds the memory held by a slow lane)
_END = object()


def lane_shares(chunks: Sequence[slice], lanes: int) -> list[tuple[slice, list[slice]]]:
    """The points of `chunks` (consecutive, from 0) in `lanes` contiguous shares of whole chunks, as equal in count
    as can be: (the share's points, its chunks counted from the share's first point) per lane."""
    shares = []
    for lane in range(lanes):
        mine = chunks[lane * len(chunks) // lanes:(lane + 1) * len(chunks) // lanes]
        start = mine[0].start
        shares.append((slice(start, mine[-1].stop), [slice(c.start - start, c.stop - start) for c in mine]))
    return shares


def run_in_lanes(lanes: Sequence[Callable[[Item], None]], items: Iterable[Item]) -> None:
    """lane(item) for every lane and item, items in order within each lane. One lane runs in the calling thread as
    is; L lanes run each in its own thread (the first in the calling one) on T // L of the caller's T intra-op
    threads, the caller's count restored after. An error in any lane stops the items and is raised here, as it was
    raised in the lane."""
    if len(lanes) == 1:
        for item in items:
            lanes[0](item)
        return
    intra_op = torch.get_num_threads()
    each = max(1, intra_op // len(lanes))
    others = [_Lane(lane, each) for lane in lanes[1:]]
    torch.set_num_threads(each)
    try:
        for other in others:
            other.thread.start()
        for item in items:
            for other in others:
                other.queue.put(item)
            lanes[0](item)
            if any(other.error is not None for other in others):
                break
    finally:
        for other in others:
            other.queue.put(_END)
        for other in others:
            other.thread.join()
        torch.set_num_threads(intra_op)
    for other in others:
        if other.error is not None:
            raise other.error


class _Lane(Generic[Item]):
    """A lane's thread: takes items from its queue until the end; after an error it only drains the queue (the
    caller never blocks on a full one)."""

    def __init__(self, run: Callable[[Item], None], threads: int):
        self.run, self.threads = run, threads
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self.error: BaseException | None = None
        self.grad = torch.is_grad_enabled()  # the caller's mode (thread-local: a new thread records gradients)
        self.thread = threading.Thread(target=self._work, name="modeconn_fast-evaluation-lane", daemon=True)

    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # a new thread's own setting (torch's OpenMP count; the kernels follow it)
        with torch.set_grad_enabled(self.grad):
            self._take_items()

    def _take_items(self) -> None:
        while (item := self.queue.get()) is not _END:
            if self.error is None:
                try:
                    self.run(item)
                except BaseException as error:  # handed to the calling thread
                    self.error = error
