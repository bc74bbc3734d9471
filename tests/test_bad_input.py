"""Bad input gives a clear error (or a NaN for that point), never a crash deep inside."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import SmallCNN, mlp, seeded, settle_batchnorm
from modeconn_fast import barrier, evaluate, interpolate


@pytest.fixture
def data():
    return torch.randn(20, 19), torch.randint(0, 5, (20,))


def test_mismatched_shapes_name_the_parameter_and_both_shapes(data):
    a = seeded(mlp, 0)
    b = nn.Sequential(nn.Linear(19, 23), nn.ReLU(), nn.Linear(23, 16), nn.Tanh(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"'2\.weight'.*\(17, 23\).*\(16, 23\)"):
        interpolate(a, b, data)


def test_missing_parameter_is_named(data):
    a = seeded(mlp, 0)
    b = nn.Sequential(nn.Linear(19, 23), nn.ReLU(), nn.Linear(23, 17, bias=False), nn.Tanh(), nn.Linear(17, 5))
    with pytest.raises(ValueError, match=r"'2\.bias'"):
        barrier(a, b, data)


def test_coefficient_rows_of_the_wrong_width(data):
    models = [seeded(mlp, s) for s in range(2)]
    with pytest.raises(ValueError, match=r"\[points, 2\].*\(4, 3\)"):
        evaluate(models[0], models, torch.rand(4, 3), data)
    with pytest.raises(ValueError, match="no rows"):
        evaluate(models[0], models, torch.rand(0, 2), data)


def test_empty_data(data):
    models = [seeded(mlp, s) for s in range(2)]
    with pytest.raises(ValueError, match="empty"):
        evaluate(models[0], models, torch.rand(3, 2), (torch.randn(0, 19), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        evaluate(models[0], models, torch.rand(3, 2), [])
    with pytest.raises(ValueError, match="different numbers of rows"):
        evaluate(models[0], models, torch.rand(3, 2), (torch.randn(5, 19), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(TypeError, match="tuple \\(inputs, targets\\)"):
        evaluate(models[0], models, torch.rand(3, 2), torch.randn(5, 19))


def test_nan_in_weights_warns_and_gives_nan(data):
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    with torch.no_grad():
        b[0].weight[3, 4] = float("nan")
    with pytest.warns(UserWarning, match=r"member 1 has non-finite values in '0\.weight'"):
        path = interpolate(a, b, data, points=3)
    assert math.isnan(float(path.loss[-1])) and math.isnan(float(path.error[-1]))


def test_batchnorm_modes_are_checked():
    images = torch.randn(12, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, s), images) for s in range(2)]
    data = (images, torch.randint(0, 4, (12,)))
    with pytest.raises(ValueError, match="needs bn_data"):
        evaluate(models[0], models, torch.rand(2, 2), data, bn="recompute")
    with pytest.raises(ValueError, match="bn must be"):
        evaluate(models[0], models, torch.rand(2, 2), data, bn="train")
    with pytest.warns(UserWarning, match="no bn_data"):
        result = evaluate(models[0], models, torch.rand(2, 2), data)
    assert result.bn_mode == "eval"


def test_metrics_are_checked(data):
    models = [seeded(mlp, s) for s in range(2)]
    with pytest.raises(ValueError, match="metrics must be"):
        evaluate(models[0], models, torch.rand(2, 2), data, metrics=("accuracy",))
    with pytest.raises(ValueError, match="integer class targets"):
        evaluate(models[0], models, torch.rand(2, 2), (data[0], torch.randn(20, 5)), metrics=("loss", "error"),
                 loss_fn=nn.MSELoss(reduction="none"))


def test_model_returning_a_tuple_is_refused(data):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, x):
            return self.body(x), x

    models = [seeded(TwoHeads, s) for s in range(2)]
    with pytest.raises(TypeError, match="one tensor"):
        evaluate(models[0], models, torch.rand(2, 2), data)
