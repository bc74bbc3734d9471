"""The pytest-benchmark tests shared by B1 and B2 (imported by test_b1_grid_tiny.py and test_b2_grid_wide.py,
each of which provides a module-scoped `workload` fixture: the workload module)."""
from __future__ import annotations

import pytest

from .harness import pedantic
from .plane import check_peers, contenders

NAMES = ["ours", "loss-landscapes", "vmap", "load_state_dict loop"]


@pytest.fixture(scope="module")
def setup(workload, quick):
    size = workload.QUICK if quick else workload.FULL
    plane = workload.prepare(size)
    ours, peers, points = contenders(plane, size)
    return plane, ours, peers, points


def test_peers_compute_our_losses(setup):
    plane, ours, peers, points = setup
    checks = check_peers(plane, ours.run(), peers, points)
    assert all(c.ok for c in checks.values()), {name: str(c) for name, c in checks.items()}


@pytest.mark.parametrize("name", NAMES)
def test_contender(benchmark, workload, setup, name):
    _, ours, peers, _ = setup
    pedantic(benchmark, {c.name: c for c in [ours, *peers]}[name], workload.WORKLOAD)
