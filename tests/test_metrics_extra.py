"""NLL, Brier score, ECE and custom metrics per point equal a plain per-point loop over the same batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import mlp, model_at, seeded, settle_batchnorm, SmallCNN
from modeconn_fast import evaluate, evaluate_curve, BezierCurve

BINS = 15


def margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """The target's logit minus the largest other logit, per sample."""
    picked = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], float("-inf"))
    return picked - others.max(dim=1).values


def loop_metrics(model, members, coeffs, batches, **load) -> dict[str, Tensor]:
    """Per point: a plain model, every batch, metrics from all its outputs; ECE from its own binning."""
    columns: dict[str, list[float]] = {name: [] for name in ("nll", "brier", "ece", "margin", "error")}
    for row in coeffs:
        net = model_at(model, members, row).eval()
        with torch.no_grad():
            outputs = torch.cat([net(x) for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        probs = outputs.softmax(dim=1)
        onehot = F.one_hot(targets, outputs.shape[1]).to(probs.dtype)
        columns["nll"].append(float(F.cross_entropy(outputs, targets)))
        columns["brier"].append(float((probs - onehot).square().sum(dim=1).mean()))
        columns["margin"].append(float(margin(outputs, targets).mean()))
        columns["error"].append(float((outputs.argmax(1) != targets).double().mean()))
        confidence, predicted = probs.max(dim=1)
        ece = 0.0
        for b in range(BINS):  # bins (b/15, (b+1)/15]; the first one also holds 0
            inside = (confidence > b / BINS) & (confidence <= (b + 1) / BINS)
            if b == 0:
                inside |= confidence == 0
            ece += abs(float((predicted[inside] == targets[inside]).double().sum() - confidence[inside].sum()))
        columns["ece"].append(ece / len(targets))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}


def test_nll_brier_ece_and_custom_metric_equal_a_loop():
    models = [seeded(mlp, seed).double() for seed in range(3)]
    inputs, targets = torch.randn(83, 19, dtype=torch.float64) * 2, torch.randint(0, 5, (83,))
    batches = [(inputs[i:i + 19], targets[i:i + 19]) for i in range(0, 83, 19)]  # uneven last batch
    coeffs = torch.rand(9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.4 - 0.2
    metrics = ("loss", "error", "nll", "brier", "ece", ("margin", margin))
    result = evaluate(models[0], models, coeffs, batches, metrics=metrics, memory_budget=20_000)  # several chunks
    assert list(result) == ["loss", "error", "nll", "brier", "ece", "margin"]
    expected = loop_metrics(models[0], models, coeffs, batches)
    for name in ("nll", "brier", "ece", "margin", "error"):
        torch.testing.assert_close(result[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)
    torch.testing.assert_close(result["loss"], result["nll"], rtol=1e-12, atol=0)  # the default loss is the NLL
    assert all(result[name].dtype == torch.float64 for name in result)


def test_named_datasets_and_curves_carry_every_metric():
    models = [seeded(mlp, seed) for seed in range(2)]
    train = (torch.randn(40, 19), torch.randint(0, 5, (40,)))
    test = (torch.randn(30, 19), torch.randint(0, 5, (30,)))
    coeffs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    metrics = ("ece", ("margin", margin))
    result = evaluate(models[0], models, coeffs, {"train": train, "test": test}, metrics=metrics)
    assert set(result) == {"train_ece", "train_margin", "test_ece", "test_margin"}
    alone = evaluate(models[0], models, coeffs, test, metrics=metrics)
    torch.testing.assert_close(result["test_ece"], alone["ece"])
    torch.testing.assert_close(result["test_margin"], alone["margin"])
    expected = loop_metrics(models[0], models, coeffs, [test])
    torch.testing.assert_close(alone["ece"], expected["ece"], rtol=1e-5, atol=1e-6)

    curve = BezierCurve(models[0], models[1], bends=1)
    columns = evaluate_curve(curve, {"train": train, "test": test}, points=3, metrics=("loss", "nll", "brier")).columns
    assert set(columns) == {"train_loss", "train_nll", "train_brier", "test_loss", "test_nll", "test_brier"}
    torch.testing.assert_close(columns["test_nll"][[0, -1]], evaluate(models[0], models, coeffs[[0, 2]], test,
                                                                       metrics=("nll",))["nll"].float(),
                               rtol=1e-5, atol=1e-6, check_dtype=False)


def test_metrics_with_batchnorm_recomputed_equal_a_loop():
    images = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    models = [settle_batchnorm(seeded(SmallCNN, seed).double(), images) for seed in (3, 4)]
    data = (torch.randn(33, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (33,)))
    coeffs = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    result = evaluate(models[0], models, coeffs, data, metrics=("nll", "brier", "ece"), bn="eval")
    expected = loop_metrics(models[0], models, coeffs, [data])
    for name in ("nll", "brier", "ece"):
        torch.testing.assert_close(result[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_nonfinite_points_get_nan():
    models = [seeded(mlp, seed) for seed in range(2)]
    with torch.no_grad():
        models[1][0].weight[0, 0] = float("inf")
    data = (torch.randn(10, 19), torch.randint(0, 5, (10,)))
    with pytest.warns(UserWarning, match="non-finite"):
        result = evaluate(models[0], models, torch.tensor([[1.0, 0.0], [0.5, 0.5]]), data,
                          metrics=("nll", "brier", "ece"))
    for name in ("nll", "brier", "ece"):
        assert torch.isfinite(result[name][0]) and torch.isnan(result[name][1])


def test_bad_metrics_are_refused():
    models = [seeded(mlp, seed) for seed in range(2)]
    data = (torch.randn(10, 19), torch.randint(0, 5, (10,)))
    coeffs = torch.rand(2, 2)
    with pytest.raises(ValueError, match="metrics must be"):
        evaluate(models[0], models, coeffs, data, metrics=("loss", "calibration"))
    with pytest.raises(ValueError, match="metrics must be"):
        evaluate(models[0], models, coeffs, data, metrics=(("nll", margin),))  # a built-in name for a custom one
    with pytest.raises(ValueError, match="twice"):
        evaluate(models[0], models, coeffs, data, metrics=("ece", "ece"))
    with pytest.raises(ValueError, match="one value per sample"):
        evaluate(models[0], models, coeffs, data, metrics=(("mean_logit", lambda out, y: out.mean()),))
    with pytest.raises(ValueError, match="integer class targets"):
        evaluate(models[0], models, coeffs, (data[0], torch.randn(10, 5)), metrics=("loss", "brier"),
                 loss_fn=F.mse_loss)
