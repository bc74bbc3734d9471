"""B2 under pytest-benchmark: the peers' losses equal ours, then each contender timed (see plane_suite.py)."""
from __future__ import annotations

import pytest

from benchmarks import b2_grid_wide
from benchmarks.plane_suite import setup, test_contender, test_peers_compute_our_losses  # noqa: F401 (collected)


@pytest.fixture(scope="module")
def workload():
    return b2_grid_wide
