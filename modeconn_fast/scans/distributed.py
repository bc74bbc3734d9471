"""Scans inside a `torchrun` job: the ranks share the chunks of the grid (chunk i goes to rank i mod world size).

`current_ranks` joins the job's process group: the one already initialised, or, when torchrun's environment
says WORLD_SIZE > 1, a new one (NCCL for CUDA tensors, gloo on CPU). Each rank computes and writes only its own
chunks; at the end every rank receives every chunk's values (`all_gather_object`) and assembles the result,
and rank 0 writes the result file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def current_ranks(device: torch.device) -> Ranks:
    """The job this process belongs to (joining it if torchrun started it and nobody has yet)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()
