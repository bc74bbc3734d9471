"""Curves trained on the bundled digits: a quadratic Bezier curve joins two MLPs where the straight line does not;
curves also train on a CNN and a residual network with BatchNorm."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import modeconn_fast as mc
from modeconn_fast.digits import load_digits_split, mlp, train_classifier
from tests.helpers import one_thread  # noqa: F401 (an autouse fixture: these small steps run on one thread)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 16, 10))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), ResidualBlock(8), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def test_bezier_curve_joins_two_mlps_where_the_line_does_not(digits):
    a = train_classifier(mlp(seed=0), digits.train, seed=0, progress=False)
    b = train_classifier(mlp(seed=1), digits.train, seed=1, progress=False)
    line = mc.interpolate(a, b, digits.train, points=25, progress=False)
    curve = mc.BezierCurve(a, b)
    mc.train_curve(curve, digits.train, epochs=30, lr=0.1, weight_decay=1e-4, batch_size=64, progress=False)
    result = mc.evaluate_curve(curve, digits.train, points=61, progress=False)
    assert line.barrier("loss") >= 0.3
    assert float(result.loss.max()) <= 0.05
    assert result.barrier("loss") < line.barrier("loss") / 5


@pytest.mark.parametrize("factory", [small_cnn, small_resnet], ids=["cnn", "resnet"])
def test_curve_trains_with_batchnorm(digits, factory):
    a = train_classifier(factory(0), digits.train, epochs=15, seed=0, progress=False)
    b = train_classifier(factory(1), digits.train, epochs=15, seed=1, progress=False)
    data = {"train": digits.train, "test": digits.test}
    line = mc.interpolate(a, b, data["train"], points=11, bn_data=digits.train[0], progress=False)
    curve = mc.BezierCurve(a, b)
    history = mc.train_curve(curve, digits.train, epochs=8, lr=0.05, batch_size=64, t_per_step=2, progress=False)
    assert history.loss[-1] < history.loss[0]
    result = mc.evaluate_curve(curve, data, points=11, bn_data=digits.train[0], progress=False)
    assert result.bn_mode == "recompute"
    assert float(result["train_loss"].max()) < 0.5 * float(line.loss.max())
    # the curve's start with recomputed statistics is model A (statistics over the whole train split)
    start = curve.model_at(0.0, bn_data=digits.train[0]).eval()
    with torch.no_grad():
        start_error = float((start(digits.test[0]).argmax(1) != digits.test[1]).double().mean())
        a_error = float((a(digits.test[0]).argmax(1) != digits.test[1]).double().mean())
    assert abs(start_error - a_error) <= 0.005
    assert abs(float(result["test_error"][0]) - start_error) <= 1e-9


def test_ensemble_from_a_trained_curve_equals_its_points(digits):
    a = train_classifier(small_cnn(0), digits.train, epochs=3, seed=0, progress=False)
    b = train_classifier(small_cnn(1), digits.train, epochs=3, seed=1, progress=False)
    curve = mc.BezierCurve(a, b)
    mc.train_curve(curve, digits.train, epochs=1, lr=0.05, progress=False)
    ts = torch.tensor([0.0, 0.4, 1.0])
    bn_data = digits.train[0][:256]
    ensemble = mc.Ensemble.from_curve(curve, ts, bn_data=bn_data)
    inputs = digits.test[0][:50]
    prediction = ensemble.predict(inputs)
    for index, t in enumerate(ts):
        member = curve.model_at(float(t), bn_data=bn_data).eval()
        with torch.no_grad():
            torch.testing.assert_close(prediction.member_probs[index], member(inputs).softmax(dim=1), rtol=1e-4, atol=1e-5)
