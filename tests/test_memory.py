"""`keep_freed_memory`: which entry points tell glibc to keep freed memory, with which settings, and the opt-out."""
from __future__ import annotations

import pytest
import torch

import modeconn_fast as mc
from modeconn_fast import memory
from modeconn_fast.rebasin import weight_matching
from tests.helpers import mlp, seeded


class RecordingLibc:
    """Stands in for the C library: records mallopt(parameter, value) instead of changing the allocator."""

    def __init__(self, calls: list[tuple[int, int]]):
        self.calls = calls

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def mallopt_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(memory, "_done", False)  # as in a fresh process
    monkeypatch.setattr(memory, "_c_library", lambda: RecordingLibc(calls))
    return calls


def random_batch(rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, 19, generator=generator), torch.randint(0, 5, (rows,), generator=generator)


def run_weight_matching() -> None:
    weight_matching(seeded(mlp, 0), seeded(mlp, 1), example_input=torch.randn(2, 19))


def run_curve_training() -> None:
    curve = mc.BezierCurve(seeded(mlp, 0), seeded(mlp, 1))
    mc.train_curve(curve, random_batch(), epochs=1, lr=0.1, batch_size=16, progress=False)


@pytest.mark.parametrize("entry", [run_weight_matching, run_curve_training], ids=["weight_matching", "train_curve"])
def test_entry_points_keep_freed_memory_once(entry, mallopt_calls):
    entry()
    assert mallopt_calls == [(memory.M_MMAP_THRESHOLD, memory.KEEP_MMAP), (memory.M_TRIM_THRESHOLD, memory.KEEP_TRIM)]
    entry()
    assert len(mallopt_calls) == 2  # once per process


def test_opting_out_leaves_the_allocator_alone(mallopt_calls, monkeypatch):
    monkeypatch.setenv("MODECONN_KEEP_FREED_MEMORY", "0")
    run_weight_matching()
    run_curve_training()
    assert mallopt_calls == []
