"""The benchmark harness's equal-results checks at a tiny size: the project and the B1 peers (loss-landscapes,
vmap + functional_call, the load_state_dict loop) compute the same per-point losses on a 4×4 plane; B6's curve
training and its 2018 reference the same loss at every step; a contender's untimed `prepare`."""
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


def test_b7_peers_agree_with_the_project_at_a_tiny_size():
    from benchmarks import b7_sequence

    size = b7_sequence.Size(side=2, samples=6, peer_points=2, vmap_chunk=2, repeats=1, train_steps=1)
    transformer, gru = (b7_sequence.measure(name, size) for name in ("Transformer", "GRU"))
    assert [p.name for p in transformer.peers] == ["load_state_dict loop", "vmap"]
    assert [p.name for p in gru.peers] == ["load_state_dict loop"] and "vmap cannot run" in gru.note
    assert transformer.checks_ok and gru.checks_ok


def test_b6_curve_training_agrees_with_the_reference_step_by_step():
    import torch

    from benchmarks import b6_curve_train as b6

    setup = b6.prepare(b6.Size(repeats=1, epochs=1))
    ours = torch.tensor(b6.ours(b6.fresh_curve(setup), setup, 1))
    reference = torch.tensor(b6.reference(b6.fresh_points(setup), setup))
    assert len(ours) == b6.STEPS
    torch.testing.assert_close(ours, reference, rtol=0, atol=b6.ATOL)


def test_a_contenders_prepare_runs_untimed_before_each_timed_run():
    import time

    from benchmarks.harness import Contender, interleaved_medians

    given: list[int] = []
    made = iter(range(100))

    def prepare() -> int:
        time.sleep(0.05)  # e.g. a copy of the start state: not the contender's time
        return next(made)

    medians = interleaved_medians([Contender("prepared", given.append, 1, 1, prepare),
                                   Contender("plain", lambda: None, 1, 1)], repeats=3)
    assert given == [0, 1, 2]
    assert medians["prepared"] < 0.04
