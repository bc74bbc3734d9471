"""Curvature: Lanczos eigenvalues and Hutchinson traces equal those of the dense Hessian
(torch.autograd.functional.hessian) at several points; the batched path equals the per-point reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from helpers import model_at, reset_and_recompute_batchnorm, seeded, settle_batchnorm
from modeconn_fast import BezierCurve, CurvatureResult, curvature, curvature_along

COEFFS = torch.tensor([[1.0, 0.0], [0.4, 0.6], [-0.2, 1.2]], dtype=torch.float64)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(40, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (40,), generator=generator)


def batches_of(inputs: Tensor, targets: Tensor, size: int = 15) -> list[tuple[Tensor, Tensor]]:
    return [(inputs[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


def dense_hessian(net: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """The Hessian of the mean cross-entropy over all the data w.r.t. every parameter, flat, in eval mode."""
    net = copy.deepcopy(net).eval()
    names, shapes = zip(*((n, p.shape) for n, p in net.named_parameters()))
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss(vector: Tensor) -> Tensor:
        parts = vector.split([s.numel() for s in shapes])
        return F.cross_entropy(functional_call(net, {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)},
                                               (inputs,)), targets)

    return torch.autograd.functional.hessian(loss, flat)


def hutchinson_error(hessian: Tensor, probes: int) -> float:
    """The standard deviation of the mean of `probes` Rademacher estimates zᵀHz: √(2(‖H‖_F² − Σ H_ii²) / n)."""
    return float((2 * (hessian.square().sum() - hessian.diagonal().square().sum()) / probes).sqrt())


def test_eigenvalues_trace_and_layers_equal_the_dense_hessian(data):
    models = [seeded(tiny, seed) for seed in range(2)]
    probes = 300
    result = curvature(models[0], models, COEFFS, batches_of(*data), top_k=3, trace=True, per_layer=True,
                       iterations=probes, tol=1e-12)
    assert isinstance(result, CurvatureResult) and result.bn_mode == "none"
    assert result.eigenvalues.shape == (3, 3) and bool(result.converged.all())
    assert set(result.per_layer) == {"0", "2"}
    blocks = {"0": slice(0, 36), "2": slice(36, 57)}
    for p, row in enumerate(COEFFS):
        hessian = dense_hessian(model_at(models[0], models, row), *data)
        expected = torch.linalg.eigvalsh(hessian).flip(0)[:3]
        torch.testing.assert_close(result.eigenvalues[p], expected, rtol=1e-6, atol=0)
        assert abs(float(result.trace[p] - hessian.trace())) <= 4 * hutchinson_error(hessian, probes)
        for name, block in blocks.items():
            sub = hessian[block, block]
            layer = result.per_layer[name]
            torch.testing.assert_close(layer.eigenvalues[p], torch.linalg.eigvalsh(sub).flip(0)[:3], rtol=1e-6, atol=0)
            # the block's trace from the whole probes: its variance counts the rows of the block against all columns
            spread = float((2 * (hessian[block].square().sum() - sub.diagonal().square().sum()) / probes).sqrt())
            assert abs(float(layer.trace[p] - sub.trace())) <= 4 * spread
    # the reported standard error estimates the true one
    exact_error = hutchinson_error(dense_hessian(models[0], *data), probes)
    assert 0.7 * exact_error <= float(result.trace_error[0]) <= 1.3 * exact_error


@pytest.mark.filterwarnings("ignore:Lanczos did not reach")  # 12 steps: equal paths matter here, not convergence
def test_batched_equals_the_per_point_path(data):
    models = [seeded(tiny, seed) for seed in range(2)]
    options = dict(top_k=2, trace=True, per_layer=True, iterations=12, tol=1e-2, seed=3)
    batched = curvature(models[0], models, COEFFS, batches_of(*data), batched=True, **options)
    plain = curvature(models[0], models, COEFFS, batches_of(*data), batched=False, **options)
    torch.testing.assert_close(batched.eigenvalues, plain.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batched.trace, plain.trace, rtol=1e-9, atol=1e-12)
    for name in batched.per_layer:
        torch.testing.assert_close(batched.per_layer[name].eigenvalues, plain.per_layer[name].eigenvalues,
                                   rtol=1e-9, atol=1e-12)
    # a pass holding one replica at a time gives the same numbers
    one_by_one = curvature(models[0], models, COEFFS, batches_of(*data), batched=True, memory_budget=1,
                           **(options | {"trace": False}))
    torch.testing.assert_close(one_by_one.eigenvalues, batched.eigenvalues, rtol=1e-9, atol=1e-12)


def test_batchnorm_statistics_recomputed_per_point(data):
    bn_inputs = torch.randn(30, 5, dtype=torch.float64) * 1.5 + 0.3
    models = [settle_batchnorm(seeded(tiny_batchnorm, seed), bn_inputs) for seed in range(2)]
    bn_batches = [bn_inputs[:16], bn_inputs[16:]]
    result = curvature(models[0], models, COEFFS[1:], batches_of(*data), bn_data=bn_batches, top_k=2,
                       iterations=200, tol=1e-12, batched=True)
    assert result.bn_mode == "recompute"
    with torch.no_grad():
        plain = curvature(models[0], models, COEFFS[1:], batches_of(*data), bn_data=bn_batches, top_k=2,
                          iterations=200, tol=1e-12, batched=False)
    torch.testing.assert_close(plain.eigenvalues, result.eigenvalues, rtol=1e-9, atol=0)
    for p, row in enumerate(COEFFS[1:]):
        net = model_at(models[0], models, row)
        reset_and_recompute_batchnorm(net, bn_batches)
        expected = torch.linalg.eigvalsh(dense_hessian(net, *data)).flip(0)[:2]
        torch.testing.assert_close(result.eigenvalues[p], expected, rtol=1e-6, atol=0)
    stored = curvature(models[0], models, COEFFS[:1], data, bn="eval", iterations=200, tol=1e-12)
    assert stored.bn_mode == "eval"
    expected = torch.linalg.eigvalsh(dense_hessian(models[0], *data))[-1]
    torch.testing.assert_close(stored.eigenvalues[0, 0], expected, rtol=1e-6, atol=0)


def test_curvature_along_a_line_and_a_curve(data):
    models = [seeded(tiny, seed) for seed in range(2)]
    with torch.no_grad():  # the products record what they need
        along = curvature_along((models[0], models[1]), data, points=3, iterations=200, tol=1e-10)
    torch.testing.assert_close(along.t, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    direct = curvature(models[0], models, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), data,
                       iterations=200, tol=1e-10)
    torch.testing.assert_close(along.eigenvalues, direct.eigenvalues, rtol=1e-8, atol=0)
    curve = BezierCurve(models[0], models[1], bends=1)
    on_curve = curvature_along(curve, data, points=2, iterations=200, tol=1e-10)  # its ends are the two models
    torch.testing.assert_close(on_curve.top, direct.top[[0, 2]], rtol=1e-8, atol=0)


def test_bad_input_is_refused(data):
    models = [seeded(tiny, seed) for seed in range(2)]
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        curvature(models[0], models, COEFFS, data, top_k=0)
    with pytest.raises(ValueError, match="larger than the number of parameters"):
        curvature(models[0], models, COEFFS, data, top_k=58)
    with pytest.raises(ValueError, match="iterations"):
        curvature(models[0], models, COEFFS, data, top_k=5, iterations=3)
    with pytest.raises(ValueError, match="empty"):
        curvature(models[0], models, COEFFS, [])
    with pytest.raises(ValueError, match="coeffs must have shape"):
        curvature(models[0], models, COEFFS[:, :1], data)
    with pytest.raises(TypeError, match="pair of models"):
        curvature_along(models[0], data)
    with pytest.warns(UserWarning, match="did not reach tol"):
        result = curvature(models[0], models, COEFFS[:1], data, top_k=2, iterations=2, tol=1e-12)
    assert not bool(result.converged[0]) and result.steps[0] == 2
