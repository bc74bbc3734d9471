"""pytest-benchmark suite, collected only when pytest is pointed here: `pytest benchmarks` (quick sizes;
MODECONN_BENCH_FULL=1 for full sizes). Timings here run one contender after another; the side-by-side table
with alternating repeats is `python -m benchmarks`."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def quick() -> bool:
    return os.environ.get("MODECONN_BENCH_FULL", "") not in ("1", "true", "yes")
