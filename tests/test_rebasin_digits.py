"""Re-Basin on digits: two (three) MLPs 64-128-128-128-10 trained to ~100 % train accuracy in seconds."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rebasin_models import build, inputs
from test_rebasin_spec import random_permutation
from torch import nn

from modeconn_fast import interpolate
from modeconn_fast.digits import load_digits_split, mlp, train_classifier
from modeconn_fast.rebasin import activation_matching, merge, permutation_spec, repair, ste_matching, weight_matching
from modeconn_fast.rebasin.repair import channel_stats, repair_points
from modeconn_fast.engine.batches import Batches


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def models(digits):
    return [train_classifier(mlp(seed=s), digits.train, epochs=40, batch_size=128, lr=2e-3, seed=s, progress=False)
            for s in (0, 1, 2)]  # fmt: skip


def barrier(a: nn.Module, b: nn.Module, data) -> float:
    return interpolate(a, b, data, progress=False).barrier("loss")


def loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(data[0]), data[1]).item()


def midpoint(a: nn.Module, b: nn.Module) -> nn.Module:
    mixed = copy.deepcopy(a)
    state_b = b.state_dict()
    mixed.load_state_dict({k: 0.5 * (v + state_b[k]) for k, v in a.state_dict().items()})
    return mixed


def test_models_fit_the_training_set(models, digits) -> None:
    for model in models:
        assert (model(digits.train[0]).argmax(1) == digits.train[1]).float().mean() >= 0.99


def test_weight_matching_removes_the_barrier(models, digits) -> None:
    model_a, model_b = models[:2]
    before = barrier(model_a, model_b, digits.train)
    aligned = weight_matching(model_a, model_b, example_input=digits.train[0][:4]).apply(model_b)
    after = barrier(model_a, aligned, digits.train)
    assert before >= 0.3
    assert after <= 0.05


def test_activation_matching_removes_most_of_the_barrier(models, digits) -> None:
    model_a, model_b = models[:2]
    aligned = activation_matching(model_a, model_b, digits.train).apply(model_b)
    assert barrier(model_a, aligned, digits.train) <= 0.1


def test_ste_matching_lowers_the_barrier(models, digits) -> None:
    model_a, model_b = models[:2]
    result = ste_matching(model_a, model_b, digits.train, epochs=1)
    assert result.iterations == len(result.loss_history) == -(-len(digits.train[1]) // 128)
    assert barrier(model_a, result.apply(model_b), digits.train) <= 0.1


def test_repair_restores_channel_statistics(models, digits) -> None:
    model_a, model_b = models[:2]
    aligned = weight_matching(model_a, model_b, example_input=digits.train[0][:4]).apply(model_b)
    repaired = repair(model_a, aligned, digits.train, alpha=0.5)
    assert loss(repaired, digits.train) < loss(midpoint(model_a, aligned), digits.train)
    batches = Batches(digits.train)
    points = repair_points(model_a, digits.train[0][:4])
    assert list(points) == ["0", "2", "4"]  # the three hidden Linear layers, not the output layer
    ends = [channel_stats(m, points, batches) for m in (model_a, aligned)]
    stats = channel_stats(repaired, points, batches)
    for name in points:
        for which in (0, 1):  # mean, std
            target = 0.5 * (ends[0][name][which] + ends[1][name][which])
            torch.testing.assert_close(stats[name][which], target, rtol=1e-3, atol=1e-3)


def test_repair_folds_into_batchnorm() -> None:
    model_a, model_b = build("vgg", seed=0), build("vgg", seed=1)
    data = (inputs(model_a, batch=32), torch.zeros(32, dtype=torch.long))
    points = repair_points(model_a, data[0])
    assert list(points) == ["features.1", "features.4", "features.8", "fc1"]
    repaired = repair(model_a, model_b, data, alpha=0.3)
    stats = channel_stats(repaired, {"features.1": 1}, Batches(data))["features.1"]
    ends = [channel_stats(m, {"features.1": 1}, Batches(data))["features.1"] for m in (model_a, model_b)]
    torch.testing.assert_close(stats[1], 0.7 * ends[0][1] + 0.3 * ends[1][1], rtol=1e-3, atol=1e-3)


def test_merge_beats_naive_averaging(models, digits) -> None:
    merged = merge(models, digits.train)
    naive = copy.deepcopy(models[0])
    naive.load_state_dict({k: sum(m.state_dict()[k] for m in models) / 3 for k in models[0].state_dict()})
    assert loss(merged, digits.train) < 0.25 * loss(naive, digits.train)
    assert (merged(digits.train[0]).argmax(1) == digits.train[1]).float().mean() >= 0.9


def test_merge_of_planted_copies_is_the_original() -> None:
    model = build("resnet", seed=0)
    x = inputs(model)
    spec = permutation_spec(model, x)
    copies = [model] + [random_permutation(spec, model, seed=s).apply(model) for s in (1, 2)]
    merged = merge(copies, example_input=x)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value.to(merged.state_dict()[key].dtype))


def test_merge_needs_two_models() -> None:
    with pytest.raises(ValueError, match="at least two"):
        merge([build("mlp")], example_input=torch.randn(2, 64))
