"""interpolate, barrier and the barrier definitions of DESIGN §5."""
from __future__ import annotations

import pytest
import torch

from helpers import mlp, plain_loop, seeded
from modeconn_fast import PathResult, barrier, interpolate, linear_coeffs


def test_interpolate_matches_plain_loop_along_the_line():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    inputs, targets = torch.randn(40, 19), torch.randint(0, 5, (40,))
    path = interpolate(a, b, (inputs, targets), points=9)
    torch.testing.assert_close(path.t, torch.linspace(0, 1, 9, dtype=torch.float64))
    expected = plain_loop(a, [a, b], linear_coeffs(path.t), [(inputs, targets)])
    torch.testing.assert_close(path.loss, expected["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(path.error, expected["error"], rtol=0, atol=1e-12)
    assert path.bn_mode == "none"


def test_loss_barrier_is_measured_against_the_line_between_the_ends():
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    loss = torch.tensor([1.0, 2.5, 3.0, 2.0, 2.0], dtype=torch.float64)  # line: 1.0, 1.25, 1.5, 1.75, 2.0
    error = torch.tensor([0.1, 0.4, 0.6, 0.2, 0.3], dtype=torch.float64)
    path = PathResult(t=t, loss=loss, error=error, bn_mode="none")
    assert path.barrier("loss") == pytest.approx(1.5)
    assert path.barrier("error") == pytest.approx(0.6 - 0.2)
    with pytest.raises(ValueError, match="metric"):
        path.barrier("accuracy")


def test_barrier_of_a_model_with_itself_is_zero():
    a = seeded(mlp, 3)
    data = (torch.randn(30, 19), torch.randint(0, 5, (30,)))
    assert abs(barrier(a, a, data)) < 1e-6
    assert barrier(a, a, data, metric="error") == pytest.approx(0.0)


def test_a_path_needs_two_points():
    a = seeded(mlp, 0)
    with pytest.raises(ValueError, match="at least 2"):
        interpolate(a, a, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)), points=1)


def test_basis_point_is_the_mixed_state_dict():
    from helpers import mixed_state
    from modeconn_fast import Basis

    models = [seeded(mlp, seed) for seed in range(3)]
    row = torch.tensor([0.2, -0.5, 1.3])
    point = Basis.from_members(models).point(row)
    for name, value in mixed_state(models, row).items():
        torch.testing.assert_close(point[name], value)
    with pytest.raises(ValueError, match="needs 3 coefficients"):
        Basis.from_members(models).point(torch.tensor([1.0, 0.0]))
