"""The benchmark harness's equal-results checks at a tiny size: the project and the B1 peers (loss-landscapes,
vmap + functional_call, the load_state_dict loop) compute the same per-point losses on a 4×4 plane."""
from __future__ import annotations

from benchmarks import b1_grid_tiny
from benchmarks.plane import PlaneSize, check_peers, contenders


def test_b1_peers_agree_with_the_project_at_a_tiny_size():
    size = PlaneSize(side=4, peer_points=16, vmap_chunk=5, repeats=1, epochs=1)
    plane = b1_grid_tiny.prepare(size)
    ours, peers, points = contenders(plane, size)
    checks = check_peers(plane, ours.run(), peers, points)
    assert set(checks) == {"loss-landscapes", "vmap", "load_state_dict loop"}
    assert all(check.ok for check in checks.values()), {name: str(check) for name, check in checks.items()}
