"""Curves: coefficients against the formulas, exact ends, gradients against a float64 plain-autograd reference,
evaluate_curve against a per-point loop, BatchNorm recomputation, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import modeconn_fast as mc
from modeconn_fast.curves import garipov_schedule
from tests.helpers import (SmallCNN, float64_batch, mlp, plain_loop, reset_and_recompute_batchnorm, seeded,
                           settle_batchnorm)


def cnn_pair() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    inputs, targets = torch.randn(24, 3, 8, 8), torch.randint(0, 4, (24,))
    a = settle_batchnorm(seeded(SmallCNN, 1), inputs)
    b = settle_batchnorm(seeded(SmallCNN, 2), inputs * 0.5)
    return a, b, inputs, targets


@pytest.mark.parametrize("bends", [1, 2])
def test_bezier_coefficients_are_bernstein_polynomials(bends):
    curve = mc.BezierCurve(mlp(), mlp(), bends=bends)
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=torch.float64)
    n = bends + 1
    expected = torch.tensor([[math.comb(n, k) * float(s) ** k * (1 - float(s)) ** (n - k) for k in range(n + 1)]
                             for s in t], dtype=torch.float64)
    torch.testing.assert_close(curve.coefficients(t), expected, rtol=1e-12, atol=0)
    if bends == 1:  # (1 − t)², 2t(1 − t), t²
        torch.testing.assert_close(curve.coefficients(t)[:, 1], 2 * t * (1 - t), rtol=1e-12, atol=0)


def test_polychain_coefficients_are_hat_functions():
    chain = mc.PolyChain(mlp(), mlp(), bends=2)  # knots at 0, 1/3, 2/3, 1
    t = torch.tensor([0.0, 1 / 6, 1 / 3, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.3, 0.7],
                             [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(chain.coefficients(t), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [mc.BezierCurve, mc.PolyChain])
def test_curve_ends_are_the_models_exactly(kind):
    a, b, inputs, _ = cnn_pair()
    curve = kind(a, b, bends=2)
    for t, model in ((0.0, a), (1.0, b)):
        at = curve.model_at(t)
        for name, value in model.state_dict().items():
            assert torch.equal(at.state_dict()[name], value), name
        torch.testing.assert_close(curve.eval()(inputs, t), model(inputs), rtol=1e-5, atol=1e-5)


def test_free_control_points_are_the_only_trainable_parameters():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    curve = mc.BezierCurve(a, b, bends=2)
    free = {name.split(".")[1] for name, p in curve.named_parameters() if p.requires_grad}
    assert free == {"1", "2"}
    loose = mc.PolyChain(a, b, fix_end=False)
    assert {name.split(".")[1] for name, p in loose.named_parameters() if p.requires_grad} == {"1", "2"}


def reference_loss(curve: mc.BezierCurve, inputs, targets, t, weight_decay):
    """Plain autograd in float64: per t, θ(t) = Σ_k c_k θ_k as one state dict, the model in train mode."""
    states = [dict(point.named_parameters()) | dict(point.named_buffers()) for point in curve.control_points]
    rows = curve.coefficients(t)
    total = 0.0
    for row in rows:
        weights = {name: sum(float(c) * s[name] for c, s in zip(row, states)) if torch.is_floating_point(value)
                   else value.clone() for name, value in states[0].items()}
        model = curve.architecture.train()
        outputs = functional_call(model, weights, (inputs,))
        norm = sum((weights[name] ** 2).sum() for name, _ in model.named_parameters())
        total = total + F.cross_entropy(outputs, targets) + 0.5 * weight_decay * norm
    curve.architecture.eval()
    return total / len(rows)


@pytest.mark.parametrize("t_values", [[0.2, 0.55, 0.9], [0.55]], ids=["three-t", "one-t"])
@pytest.mark.parametrize("factory", [mlp, SmallCNN], ids=["mlp", "cnn-batchnorm"])
def test_control_point_gradients_match_plain_autograd(factory, t_values):
    from modeconn_fast.curves.train import _data_loss

    torch.manual_seed(3)
    inputs, targets = float64_batch(factory)
    a, b = seeded(factory, 0).double(), seeded(factory, 1).double()
    curve = mc.BezierCurve(a, b, bends=2, fix_end=False).double().train()
    with torch.no_grad():  # move the bends off the straight line
        for point in curve.control_points[1:3]:
            for p in point.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    t = torch.tensor(t_values, dtype=torch.float64)
    free = [p for p in curve.parameters() if p.requires_grad]

    rows = curve.coefficients(t)
    data_loss = _data_loss(curve, inputs, targets, rows, F.cross_entropy)
    # one t: the plain model at that point (`one_point.py`); several of a Sequential: sample-major; else the view
    assert (curve._view is None) == (len(t) == 1 or factory is mlp)
    data_loss.backward()  # the data loss through autograd, then the weight decay term's gradient added directly
    ours = data_loss.item() + curve.add_weight_decay(rows, 0.01)
    expected = reference_loss(curve, inputs, targets, t, weight_decay=0.01)
    expected_grads = torch.autograd.grad(expected, free)
    assert ours == pytest.approx(expected.detach().item(), rel=1e-10, abs=1e-12)
    for p, want in zip(free, expected_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-8, atol=1e-10)


class TiedScaled(nn.Module):
    """Three Linear layers, the first two sharing their weight, or (own_parameter) not, and a parameter of the
    model's own."""

    def __init__(self, own_parameter: bool) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(19, 19), nn.Linear(19, 5)
        self.tied = nn.Linear(19, 19, bias=False)
        if not own_parameter:  # (the view's per-point fallback does not take tied weights)
            self.tied.weight = self.first.weight
        self.scale = nn.Parameter(torch.tensor(1.5)) if own_parameter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.tied(torch.relu(self.first(x))))
        return self.second(y if self.scale is None else y * self.scale)


@pytest.mark.filterwarnings("ignore:the model holds tensors of its own")  # the view runs that one per point
@pytest.mark.parametrize("own_parameter", [False, True], ids=["tied", "own-parameter"])
def test_one_t_in_train_mode_gives_the_views_outputs_and_gradients(own_parameter):
    torch.manual_seed(4)
    factory = lambda: TiedScaled(own_parameter)
    curve = mc.BezierCurve(seeded(factory, 0), seeded(factory, 1), fix_end=False).double().train()
    inputs, rows = torch.randn(7, 19, dtype=torch.float64), curve.coefficients(torch.tensor([0.3]))
    free = [p for p in curve.parameters() if p.requires_grad]
    results = []
    for stacked in (None, curve.stacked()):  # the plain model at the point (where supported), then the view
        out = curve.outputs(inputs, rows, stacked)
        results.append((out, torch.autograd.grad(out.sin().sum(), free)))
    assert (curve._one_point is False) == own_parameter  # a model's own parameter: the view runs it
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for mine, viewed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(mine, viewed, rtol=1e-10, atol=1e-12)


def sequential_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False), nn.Tanh(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 7), nn.BatchNorm1d(7), nn.ReLU(),
                         nn.Linear(7, 4))


def grouped_first() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 6, 3, groups=2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 3))


def batchnorm_first() -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(19), nn.Linear(19, 8), nn.GELU(), nn.Linear(8, 5))


def pool_on_features() -> nn.Module:  # MaxPool1d on [N, D] pools along D as if N were channels
    return nn.Sequential(nn.Linear(19, 9), nn.MaxPool1d(2), nn.Linear(4, 3))


@pytest.mark.parametrize("factory, shape", [(sequential_cnn, (9, 3, 8, 8)), (grouped_first, (9, 4, 9)),
                                            (batchnorm_first, (9, 19)), (mlp, (9, 19)), (mlp, (9, 2, 19)),
                                            (pool_on_features, (9, 19))],
                         ids=["cnn", "grouped-conv-first", "batchnorm-first", "mlp", "mlp-on-sequences",
                              "pool-on-features"])
def test_several_t_in_train_mode_of_a_sequential_give_the_views_outputs_and_gradients(factory, shape, monkeypatch):
    from modeconn_fast.curves import sample_major

    torch.manual_seed(5)
    curve = mc.BezierCurve(seeded(factory, 0), seeded(factory, 1), bends=2, fix_start=False).double().train()
    inputs, rows = torch.randn(*shape, dtype=torch.float64), curve.coefficients(torch.tensor([0.1, 0.45, 0.8]))
    free = [p for p in curve.parameters() if p.requires_grad]
    results = []
    for stacked in (None, "chunks", curve.stacked()):  # sample-major (`sample_major.py`), in chunks, the view
        if stacked == "chunks" and curve._sample_major:  # two points, then one
            monkeypatch.setattr(sample_major, "CHUNK_ELEMENTS", 2 * curve._sample_major.largest)
        out = curve.outputs(inputs, rows, None if stacked == "chunks" else stacked)
        results.append((out, torch.autograd.grad(out.sin().sum(), free)))
    # the view runs a Linear on 3-d inputs and pooling over an input without its channel axis
    assert bool(curve._sample_major) == ((len(shape) == 2 or factory is not mlp) and factory is not pool_on_features)
    for output, grads in results[:2]:
        torch.testing.assert_close(output, results[2][0], rtol=1e-10, atol=1e-12)
        for mine, viewed in zip(grads, results[2][1]):
            torch.testing.assert_close(mine, viewed, rtol=1e-9, atol=1e-11)


def test_weight_decay_gradient_added_directly_matches_autograd():
    """½·wd·mean_t ‖θ(t)‖² on a chain (rows with zeros), one free parameter frozen, some grads still None."""
    chain = mc.PolyChain(seeded(mlp, 0).double(), seeded(mlp, 1).double(), bends=2, fix_end=False).double()
    frozen = chain.control_points[1][0].bias.requires_grad_(False)
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    free = [p for p in chain.parameters() if p.requires_grad]
    rows = chain.coefficients(torch.tensor([0.1, 0.5, 0.5, 0.95], dtype=torch.float64))

    def plain_term():
        states = [dict(point.named_parameters()) for point in chain.control_points]
        norms = [sum((sum(float(c) * s[name] for c, s in zip(row, states)) ** 2).sum() for name in states[0])
                 for row in rows]
        return 0.5 * 0.03 * torch.stack(norms).mean()

    expected = plain_term()
    expected_grads = torch.autograd.grad(expected, free)
    value = chain.add_weight_decay(rows, 0.03)
    assert value == pytest.approx(expected.detach().item(), rel=1e-12)
    for p, want in zip(free, expected_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-14)
    assert frozen.grad is None
    chain.control_points[0][0].weight.data = torch.randn_like(chain.control_points[0][0].weight)  # memory moved
    assert chain.add_weight_decay(rows, 0.03) == pytest.approx(plain_term().detach().item(), rel=1e-12)


@pytest.mark.parametrize("recompute", [False, True], ids=["stored-bn", "recomputed-bn"])
def test_evaluate_curve_equals_a_per_point_loop(recompute):
    a, b, inputs, targets = cnn_pair()
    curve = mc.BezierCurve(a, b)
    with torch.no_grad():
        for p in curve.control_points[1].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bn_data = [inputs[:12], inputs[12:]] if recompute else None
    result = mc.evaluate_curve(curve, (inputs, targets), points=7, bn_data=bn_data, bn="recompute" if recompute else "eval",
                               progress=False)
    assert result.bn_mode == ("recompute" if recompute else "eval")
    rows = curve.coefficients(result.t).float()
    expected = plain_loop(curve.architecture, list(curve.control_points), rows, [(inputs, targets)],
                          bn="recompute" if recompute else "eval", bn_batches=bn_data or ())
    torch.testing.assert_close(result.loss, expected["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.error, expected["error"], rtol=0, atol=1e-12)


def test_evaluate_curve_columns_and_summary():
    a, b, inputs, targets = cnn_pair()
    curve = mc.PolyChain(a, b)
    data = {"train": (inputs[:16], targets[:16]), "test": (inputs[16:], targets[16:])}
    result = mc.evaluate_curve(curve, data, points=5, bn_data=inputs, progress=False)
    assert set(result.columns) == {"train_loss", "train_error", "test_loss", "test_error"}
    assert torch.equal(result.loss, result["train_loss"])
    # the chain's segments: straight lines, so the length is ‖θ_1 − θ_A‖ + ‖θ_B − θ_1‖
    points = [{n: v.detach() for n, v in p.named_parameters()} for p in curve.control_points]
    direct = sum(math.sqrt(sum(float(((points[k + 1][n] - points[k][n]) ** 2).sum()) for n in points[0]))
                 for k in range(2))
    assert result.length == pytest.approx(direct, rel=1e-6)
    assert curve.length() == pytest.approx(direct, rel=1e-6)
    summary = result.summary()["test_loss"]
    values = result["test_loss"]
    assert summary["max"] == pytest.approx(float(values.max())) and summary["min"] == pytest.approx(float(values.min()))
    assert summary["min"] <= summary["int"] <= summary["max"]
    line = (1 - result.t) * values[0] + result.t * values[-1]
    assert result.barrier("loss", dataset="test") == pytest.approx(float((values - line).max()))


def test_model_at_recomputes_batchnorm_like_the_reference():
    a, b, inputs, _ = cnn_pair()
    curve = mc.BezierCurve(a, b)
    batches = [inputs[:10], inputs[10:]]
    ours = curve.model_at(0.3, bn_data=batches)
    plain = curve.model_at(0.3)
    reset_and_recompute_batchnorm(plain, batches)
    for name, value in plain.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.eval()(inputs), plain.eval()(inputs), rtol=1e-5, atol=1e-5)


def test_several_t_in_one_pass_equal_each_t_alone():
    a, b, inputs, _ = cnn_pair()
    curve = mc.BezierCurve(a, b).train()
    t = torch.tensor([0.1, 0.6, 0.8])
    together = curve(inputs, t)
    for i, value in enumerate(t):
        torch.testing.assert_close(together[i], curve(inputs, value), rtol=1e-5, atol=1e-5)


def test_garipov_schedule_and_history():
    assert [garipov_schedule(1.0, e, 10) for e in (0, 5, 7, 9)] == pytest.approx([1.0, 1.0, 1 - 0.5 * 0.99, 0.01])
    torch.manual_seed(0)
    inputs, targets = torch.randn(40, 19), torch.randint(0, 5, (40,))
    curve = mc.BezierCurve(seeded(mlp, 0), seeded(mlp, 1))
    history = mc.train_curve(curve, (inputs, targets), epochs=4, lr=0.1, batch_size=16, t_per_step=2, progress=False)
    # epochs counted from 1, as the reference's training loop counts them: the last epoch runs at 0.01·lr
    assert history.lr == pytest.approx([garipov_schedule(0.1, e, 4) for e in range(1, 5)])
    assert history.lr[0] == pytest.approx(0.1) and history.lr[-1] == pytest.approx(0.001)
    assert len(history.loss) == 4 and len(history.step_loss) == 4 * 3
    assert history.loss[-1] < history.loss[0]
    assert {name.split(".")[0] for name in curve.state_dict()} == {"control_points"}  # the view is a cache only
    copied = copy.deepcopy(curve)  # after training, a copy (e.g. the best curve so far) is an independent curve
    torch.testing.assert_close(copied(inputs, 0.4), curve(inputs, 0.4))


class Centred(nn.Module):
    """Subtracts the batch mean: mixes samples along the batch axis (the view runs it per point)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(19, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y - y.mean(dim=0)


def test_a_copy_reuses_the_view_checks_unless_the_model_runs_per_point(monkeypatch):
    from modeconn_fast.engine import SubspaceView

    inputs, t = torch.randn(6, 19), 0.3
    curve = mc.BezierCurve(seeded(mlp, 0), seeded(mlp, 1)).eval()  # in eval mode the view runs every model
    expected = curve(inputs, t)
    checks = curve._view.reads_shared_rows_only
    prepared = []
    original_prepare = SubspaceView.prepare
    monkeypatch.setattr(SubspaceView, "prepare",
                        lambda view, *args: prepared.append(1) or original_prepare(view, *args))
    copied = copy.deepcopy(curve)
    torch.testing.assert_close(copied(inputs, t), expected, rtol=0, atol=0)
    assert prepared == [] and copied._view.reads_shared_rows_only == checks

    with pytest.warns(UserWarning, match="whole model per point"):
        centred = mc.BezierCurve(seeded(Centred, 0), seeded(Centred, 1)).eval()
        expected = centred(inputs, t)
    prepared.clear()
    with pytest.warns(UserWarning, match="whole model per point"):
        torch.testing.assert_close(copy.deepcopy(centred)(inputs, t), expected, rtol=0, atol=0)
    assert prepared == [1]  # checked again, and run per point again


def test_bad_input_raises_before_training():
    a = seeded(mlp, 0)
    other = nn.Sequential(nn.Linear(19, 24), nn.ReLU(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 5))
    with pytest.raises(ValueError, match=r"'0.weight'.*\(23, 19\).*\(24, 19\)"):
        mc.BezierCurve(a, other)
    with pytest.raises(ValueError, match="bends"):
        mc.BezierCurve(a, seeded(mlp, 1), bends=0)
    curve = mc.PolyChain(a, seeded(mlp, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curve.coefficients(torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curve.model_at(-0.1)
    before = [p.clone() for p in curve.parameters()]
    with pytest.raises(ValueError, match="empty"):
        mc.train_curve(curve, (torch.zeros(0, 19), torch.zeros(0, dtype=torch.long)), epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="t_per_step"):
        mc.train_curve(curve, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)), epochs=1, lr=0.1, t_per_step=0)
    assert all(torch.equal(p, q) for p, q in zip(before, curve.parameters()))
