"""Ensemble: one batched pass of the subspace view against a plain loop over its members' forwards."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import (SmallCNN, mixed_state, mlp, model_at, one_thread, reset_and_recompute_batchnorm,  # noqa: F401
                     seeded, settle_batchnorm)  # one_thread: a fixture, active here
from modeconn_fast import Basis, Ensemble, evaluate
from modeconn_fast.curves import ReliabilityBins


class LinearCurve:
    """A stand-in for the curves: the straight line between two models, basis (θ_A, θ_B), rows (1 − t, t)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module):
        self.architecture = model_a
        self._members = [model_a, model_b]

    def basis(self) -> Basis:
        return Basis.from_members(self._members)

    def coefficients(self, t: Tensor) -> Tensor:
        return torch.stack([1 - t, t], dim=1)


def plain_probs(models: list[nn.Module], inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.stack([F.softmax(m.eval()(inputs), dim=1) for m in models]).double()


def plain_ece(probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """Guo et al. 2017 written out: bins (lo, hi], weighted |accuracy − confidence|."""
    confidence, predicted = probs.max(dim=1)
    total = 0.0
    for b in range(bins):
        inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        if inside.any():
            accuracy = (predicted[inside] == targets[inside]).double().mean()
            total += float(inside.double().mean() * (accuracy - confidence[inside].double().mean()).abs())
    return total


def test_predictions_equal_a_loop_over_the_members():
    members = [seeded(mlp, seed) for seed in range(4)]
    inputs = torch.randn(50, 19)
    prediction = Ensemble(members).predict(inputs)
    p = plain_probs(members, inputs)  # [M, N, C]
    mean = p.mean(dim=0)
    entropy = -(mean * mean.log()).sum(dim=1)
    member_entropy = -(p * p.log()).sum(dim=2).mean(dim=0)
    variance = ((p - mean) ** 2).mean(dim=0).mean(dim=1)
    close = dict(rtol=1e-5, atol=1e-6, check_dtype=False)
    torch.testing.assert_close(prediction.member_probs, p, **close)
    torch.testing.assert_close(prediction.probs, mean, **close)
    torch.testing.assert_close(prediction.entropy, entropy, **close)
    torch.testing.assert_close(prediction.mutual_information, entropy - member_entropy, **close)
    torch.testing.assert_close(prediction.variance, variance, **close)
    assert prediction.bn_mode == "none" and (prediction.mutual_information > 0).all()


def test_evaluate_equals_a_plain_loop_over_batches():
    members = [seeded(mlp, seed) for seed in range(3)]
    inputs, targets = torch.randn(61, 19), torch.randint(0, 5, (61,))
    batches = [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 61, 16)]
    result = Ensemble(members).evaluate(batches)
    p = plain_probs(members, inputs)
    mean = p.mean(dim=0)
    assert result.loss == pytest.approx(float(-mean[torch.arange(61), targets].log().mean()), rel=1e-5)
    assert result.error == float((mean.argmax(dim=1) != targets).double().mean())
    assert result.ece == pytest.approx(plain_ece(mean, targets), rel=1e-5, abs=1e-9)
    engine = evaluate(members[0], members, torch.eye(3), (inputs, targets))  # each member alone
    torch.testing.assert_close(result.member_loss, engine["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.member_error, engine["error"], rtol=0, atol=1e-12)
    expected_ece = torch.tensor([plain_ece(p[m], targets) for m in range(3)], dtype=torch.float64)
    torch.testing.assert_close(result.member_ece, expected_ece, rtol=1e-5, atol=1e-9)
    assert int(result.reliability.count.sum()) == 61 and result.member_reliability.count.shape == (3, 15)


def test_chunks_of_members_give_the_same_predictions():
    members = [seeded(mlp, seed) for seed in range(5)]
    inputs = torch.randn(300, 19)
    whole = Ensemble(members).predict(inputs)
    chunked = Ensemble(members, memory_budget=40_000).predict(inputs)  # several chunks of members and of rows
    torch.testing.assert_close(chunked.member_probs, whole.member_probs, rtol=1e-5, atol=1e-6)


def test_batchnorm_recomputed_in_one_pass_equals_per_member_recomputation():
    inputs = torch.randn(48, 3, 8, 8)
    members = [settle_batchnorm(seeded(SmallCNN, seed), inputs * (1 + seed)) for seed in range(3)]
    bn_batches = [inputs[i:i + 16] for i in range(0, 48, 16)]
    ensemble = Ensemble(members, bn_data=bn_batches)
    prediction = ensemble.predict(inputs[:20])
    expected = []
    for member in members:
        own = copy.deepcopy(member)
        reset_and_recompute_batchnorm(own, bn_batches)
        expected.append(own)
    torch.testing.assert_close(prediction.member_probs, plain_probs(expected, inputs[:20]), rtol=1e-5, atol=1e-6,
                               check_dtype=False)
    assert prediction.bn_mode == "recompute"
    for model, reference in zip(ensemble.models, expected):  # the listed members carry the recomputed statistics
        for name, value in reference.state_dict().items():
            if "running" in name:
                torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    stored = Ensemble(members).predict(inputs[:20])  # without bn_data: each member's own statistics
    torch.testing.assert_close(stored.member_probs, plain_probs(members, inputs[:20]), rtol=1e-5, atol=1e-6,
                               check_dtype=False)
    assert stored.bn_mode == "eval"


@pytest.mark.parametrize("with_batchnorm", [False, True])
def test_ensemble_from_a_curve_equals_its_points(with_batchnorm):
    factory, shape = (SmallCNN, (3, 8, 8)) if with_batchnorm else (mlp, (19,))
    inputs = torch.randn(32, *shape)
    a, b = seeded(factory, 0), seeded(factory, 1)
    if with_batchnorm:
        settle_batchnorm(a, inputs), settle_batchnorm(b, inputs * 2)
    ts = torch.tensor([0.0, 0.3, 0.5, 1.0])
    ensemble = Ensemble.from_curve(LinearCurve(a, b), ts, bn_data=inputs if with_batchnorm else None)
    points = [model_at(a, [a, b], torch.stack([1 - t, t])) for t in ts]
    if with_batchnorm:
        for point in points:
            reset_and_recompute_batchnorm(point, [inputs])
    prediction = ensemble.predict(inputs)
    torch.testing.assert_close(prediction.member_probs, plain_probs(points, inputs), rtol=1e-5, atol=1e-6,
                               check_dtype=False)
    assert len(ensemble) == 4 and prediction.bn_mode == ("recompute" if with_batchnorm else "none")
    for model, t in zip(ensemble.models, ts):
        expected = mixed_state([a, b], torch.stack([1 - t, t]))
        for name in ("0.weight",) if not with_batchnorm else ("head.0.weight", "features.1.weight"):
            torch.testing.assert_close(model.state_dict()[name], expected[name])


def test_reliability_bins_and_ece():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0])
    bins = ReliabilityBins.zeros(bins=10)
    bins.add(probs, targets)
    assert bins.count.tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0]  # (lo, hi]: 0.5 falls into (0.4, 0.5]
    assert bins.correct.tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 1, 0]
    assert float(bins.ece()) == pytest.approx((0.5 + 0.6 + 0.2 + 0.1) / 4)
    assert math.isnan(float(bins.accuracy()[0])) and float(bins.confidence()[8]) == pytest.approx(0.9)


def test_bad_input_is_refused():
    a = seeded(mlp, 0)
    other = nn.Sequential(nn.Linear(19, 23), nn.ReLU(), nn.Linear(23, 16), nn.Tanh(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        Ensemble([a, other])
    with pytest.raises(ValueError, match="ts is empty"):
        Ensemble.from_curve(LinearCurve(a, a), [])
    with pytest.raises(ValueError, match=r"coeffs must have shape \[members ≥ 1, 2\]"):
        Ensemble.from_basis(a, Basis.from_members([a, a]), torch.ones(3, 3))
    with pytest.raises(ValueError, match="integer class targets"):
        Ensemble([a]).evaluate((torch.randn(4, 19), torch.rand(4)))
    scores = nn.Sequential(nn.Linear(19, 1), nn.Flatten(0))  # one score per input, no class axis
    with pytest.raises(ValueError, match="class scores"):
        Ensemble([scores]).predict(torch.randn(4, 19))
