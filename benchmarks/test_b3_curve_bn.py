"""B3 curve-bn under pytest-benchmark: the 2018 reference's metrics equal ours (≤ 1e-4), then both timed."""
from __future__ import annotations

import pytest

from benchmarks import b3_curve_bn as b3
from benchmarks.harness import pedantic


@pytest.fixture(scope="module")
def setup(quick):
    size = b3.QUICK if quick else b3.FULL
    return b3.contenders(b3.prepare(size), size)


def test_reference_computes_our_metrics(setup):
    ours, peer, index = setup
    agreement = b3.check(ours.run(), peer.run(), index)
    assert agreement.ok, str(agreement)


@pytest.mark.parametrize("name", ["ours", "2018 reference"])
def test_b3(benchmark, setup, name):
    ours, peer, _ = setup
    pedantic(benchmark, ours if name == "ours" else peer, b3.WORKLOAD)
