"""Planes and lines: Garipov's orthonormal frame, the affine plane, Li et al.'s filter-normalised directions,
projection of a curve onto a plane."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import SmallCNN, mlp, seeded, settle_batchnorm
from modeconn_fast import Basis, Line, Plane


def _flat(state: dict, names) -> torch.Tensor:
    return torch.cat([state[n].double().flatten() for n in names])


def _parameters(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_plane_through_is_garipovs_orthonormal_frame():
    models = [seeded(mlp, s) for s in range(3)]
    plane = Plane.through(*models, names=("A", "C", "B"))
    names = _parameters(models[0])
    w0, w1, w2 = (_flat(m.state_dict(), names) for m in models)
    u = (w2 - w0) / (w2 - w0).norm()
    v = (w1 - w0) - ((w1 - w0) @ u) * u
    v = v / v.norm()
    basis_u = _flat({n: plane.basis.stacked[n][1] for n in names}, names)
    basis_v = _flat({n: plane.basis.stacked[n][2] for n in names}, names)
    torch.testing.assert_close(basis_u, u, rtol=0, atol=1e-6)
    torch.testing.assert_close(basis_v, v, rtol=0, atol=1e-6)
    assert plane.marks["A"] == (0.0, 0.0)
    assert plane.marks["B"] == pytest.approx((float((w2 - w0).norm()), 0.0))
    assert plane.marks["C"] == pytest.approx((float((w1 - w0) @ u), float((w1 - w0) @ v)))
    for name, model in zip(("A", "C", "B"), models):  # each model is the point at its coordinates
        state = plane.basis.point(plane.rows(torch.tensor([plane.marks[name]]))[0])
        for entry, tensor in model.state_dict().items():
            torch.testing.assert_close(state[entry], tensor, rtol=0, atol=1e-5)


def test_plane_through_keeps_batchnorm_buffers_consistent_and_leaves_them_out_of_the_norms():
    x = torch.randn(24, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, s), x * (1 + s)) for s in range(3)]
    plane = Plane.through(*models)
    for name, model in zip(("m0", "m1", "m2"), models):
        state = plane.basis.point(plane.rows(torch.tensor([plane.marks[name]]))[0])
        torch.testing.assert_close(state["features.1.running_var"], model.state_dict()["features.1.running_var"],
                                   rtol=1e-5, atol=1e-5)
    names = _parameters(models[0])
    w0, w2 = (_flat(m.state_dict(), names) for m in (models[0], models[2]))
    assert plane.marks["m2"][0] == pytest.approx(float((w2 - w0).norm()))


def test_plane_through_refuses_models_on_one_line():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    middle = {n: (a.state_dict()[n] + b.state_dict()[n]) / 2 for n in a.state_dict()}
    with pytest.raises(ValueError, match="one line"):
        Plane.through(a, middle, b)


def test_affine_plane_and_line_put_the_models_at_unit_coordinates():
    models = [seeded(mlp, s) for s in range(3)]
    plane = Plane.affine(*models)
    line = Line.through(models[0], models[2])
    for coords, model in zip([(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], models):
        state = plane.basis.point(plane.rows(torch.tensor([coords]))[0])
        torch.testing.assert_close(state["0.weight"], model.state_dict()["0.weight"], rtol=0, atol=1e-6)
    state = line.basis.point(line.rows(torch.tensor([[0.25]]))[0])
    expected = 0.75 * models[0].state_dict()["2.weight"] + 0.25 * models[2].state_dict()["2.weight"]
    torch.testing.assert_close(state["2.weight"], expected, rtol=0, atol=1e-6)


def test_filter_normalised_directions_follow_li_et_al():
    model = settle_batchnorm(seeded(SmallCNN, 0), torch.randn(24, 3, 8, 8))
    plane = Plane.random(model, normalization="filter", ignore="biasbn", seed=3)
    state = model.state_dict()
    parameters = set(_parameters(model))
    for k in (1, 2):
        for name, weight in state.items():
            if not torch.is_floating_point(weight):
                continue
            direction = plane.basis.stacked[name][k]
            if name not in parameters or weight.dim() <= 1:  # buffers, biases, BatchNorm scales and shifts
                assert torch.count_nonzero(direction) == 0, name
                continue
            filters = weight.shape[0]
            torch.testing.assert_close(direction.reshape(filters, -1).norm(dim=1),
                                       weight.reshape(filters, -1).norm(dim=1), rtol=1e-5, atol=1e-7)
    d1, d2 = plane.basis.stacked["features.0.weight"][1:]
    assert not torch.allclose(d1, d2)  # two different draws
    again = Plane.random(model, normalization="filter", ignore="biasbn", seed=3)
    assert torch.equal(again.basis.stacked["head.0.weight"], plane.basis.stacked["head.0.weight"])
    other_seed = Plane.random(model, seed=4)
    assert not torch.equal(other_seed.basis.stacked["head.0.weight"], plane.basis.stacked["head.0.weight"])


def test_layer_normalisation_and_no_ignore():
    model = seeded(mlp, 0)
    line = Line.random(model, normalization="layer", ignore=None, seed=1)
    for name, weight in model.state_dict().items():
        assert float(line.basis.stacked[name][1].norm()) == pytest.approx(float(weight.norm()), rel=1e-5)
    raw = Line.random(model, normalization=None, seed=1)
    direction = raw.basis.stacked["0.weight"][1]
    assert abs(float(direction.std()) - 1) < 0.1 and abs(float(direction.mean())) < 0.1  # Gaussian, not uniform


def test_unknown_normalization_is_named():
    with pytest.raises(ValueError, match="normalization must be 'filter', 'layer' or None, got 'filters'"):
        Plane.random(seeded(mlp, 0), normalization="filters")
    with pytest.raises(ValueError, match="ignore must be"):
        Line.random(seeded(mlp, 0), ignore="bias")


def test_projection_of_a_curve_onto_the_plane():
    models = [seeded(mlp, s) for s in range(3)]
    plane = Plane.through(models[0], models[1], models[2])
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    line = plane.project([models[0], models[2]], torch.stack([1 - t, t], dim=1))  # the straight line m0 → m2
    torch.testing.assert_close(line[:, 0], t * plane.marks["m2"][0])
    torch.testing.assert_close(line[:, 1], torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-6)
    marks = plane.project(Basis.from_members(models), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(marks, torch.tensor([plane.marks[n] for n in ("m0", "m1", "m2")], dtype=torch.float64),
                               rtol=0, atol=1e-5)
    # a point off the plane: its least-squares coordinates, checked against materialised weights
    fourth = seeded(mlp, 7)
    names = [n for n, _ in models[0].named_parameters()]
    off = plane.project([fourth], torch.ones(1, 1, dtype=torch.float64))[0]
    w0 = _flat(models[0].state_dict(), names)
    u, v = (_flat({n: plane.basis.stacked[n][k] for n in names}, names) for k in (1, 2))
    delta = _flat(fourth.state_dict(), names) - w0
    assert off.tolist() == pytest.approx([float(delta @ u), float(delta @ v)], rel=1e-4)


def test_extent_surrounds_the_models():
    plane = Plane.affine(*[seeded(mlp, s) for s in range(3)])
    (x0, x1), (y0, y1) = plane.extent(margin=0.25)
    assert (x0, x1, y0, y1) == pytest.approx((-0.25, 1.25, -0.25, 1.25))
    assert math.isclose(Plane.random(seeded(mlp, 0)).extent()[0][1], 1.0)
