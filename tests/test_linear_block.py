"""LinearBlock: Linear → [ReLU] → Linear … of an nn.Sequential, run point by point (oneDNN, bias and ReLU in the
epilogue) or layer by layer (ReLU in place), equals the plain path (`evaluate(..., fast=False)`) and a plain
per-point loop; models that read inside the Sequential get each layer's own output."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_same_loss_and_error, plain_loop, seeded
from modeconn_fast import Basis, SubspaceView, evaluate, linear_cpu
from modeconn_fast.engine.conv_block import FusedSequential
from modeconn_fast.engine import linear_block
from modeconn_fast.engine.linear_block import LinearBlock

pytestmark = pytest.mark.skipif(not linear_cpu.ONEDNN, reason="this torch has no oneDNN linear")
METRICS = ("loss", "error", "nll", "brier")
WIDE = 512  # 67 samples · 512 · 512 multiply-adds a point reach linear_cpu.MIN_MACS: the fast path applies


def coefficient_rows(points: int, members: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(points, members, generator=generator) * 1.6 - 0.3


def wide_mlp(in_features: int = 19, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, WIDE), nn.ReLU(inplace), nn.Linear(WIDE, WIDE), nn.ReLU(inplace),
                         nn.Linear(WIDE, 5))


def counted_onednn(monkeypatch, per_point_faster: bool = True) -> list[bool]:
    """Records the `relu` flag of every oneDNN linear the fast paths run, with the timings that choose them replaced
    by the given outcome."""
    monkeypatch.setattr(linear_block, "_faster_per_point", {})
    monkeypatch.setattr(linear_cpu, "_faster_per_point", {})  # the layers' own choice (the same timing) as well
    monkeypatch.setattr(linear_cpu, "best_seconds", lambda runs, *args: [0.0, 1.0] if per_point_faster else [1.0, 0.0])
    calls: list[bool] = []
    onednn = linear_cpu.onednn_linear
    monkeypatch.setattr(linear_cpu, "onednn_linear",
                        lambda x, w, b, relu=False: calls.append(relu) or onednn(x, w, b, relu=relu))
    return calls


def assert_fast_equals_plain_and_loop(models, data, coeffs) -> None:
    fast = evaluate(models[0], models, coeffs, data, metrics=METRICS, progress=False)
    plain = evaluate(models[0], models, coeffs, data, metrics=METRICS, fast=False, progress=False)
    for name in METRICS:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7)
    assert_same_loss_and_error(fast, plain_loop(models[0], models, coeffs, [data]))


def test_a_run_of_linear_and_relu_layers_is_one_block():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3), nn.Tanh(),
                          nn.Linear(3, 3))
    view = SubspaceView(model, Basis.from_members([model, model]))
    assert isinstance(view.net, FusedSequential) and len(view.net) == 7  # its children are still the layers
    steps = view.net.steps
    assert [type(step) for step in steps] == [LinearBlock, nn.Tanh, type(view.net[6])]  # a lone Linear stays itself
    assert [relu is not None for _, relu in steps[0].layers] == [True, True, False]


@pytest.mark.parametrize("in_features, inplace", [(19, False), (2, True)])  # K=3 < 19: per-basis first layer
def test_wide_mlp_block_equals_plain_path_and_loop(monkeypatch, in_features, inplace):
    calls = counted_onednn(monkeypatch)
    models = [seeded(lambda: wide_mlp(in_features, inplace), seed) for seed in (1, 2, 3)]
    data = (torch.randn(67, in_features), torch.randint(0, 5, (67,)))
    coeffs = coefficient_rows(7, 3, seed=7)
    assert_fast_equals_plain_and_loop(models, data, coeffs)
    layers_per_point = 2 if in_features > 3 else 3  # the first layer mixed from its K per-basis outputs, or not
    assert calls.count(True) == 7 * (layers_per_point - 1) and calls.count(False) == 7


class BehindTanh(nn.Module):
    """The block fed a per-point input (not the shared one)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(19, 19)
        self.body = wide_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.first(x)))


def test_block_on_a_per_point_input_equals_plain_path_and_loop(monkeypatch):
    calls = counted_onednn(monkeypatch)
    models = [seeded(BehindTanh, seed) for seed in (4, 5)]
    assert_fast_equals_plain_and_loop(models, (torch.randn(67, 19), torch.randint(0, 5, (67,))),
                                      coefficient_rows(5, 2, seed=8))
    assert calls.count(True) == 5 * 2


class KeepsHidden(nn.Module):
    """Iterates over its Sequential and keeps the second Linear's output before its ReLU, and slices it: the
    fused Sequential's children must stay the layers themselves, their outputs unchanged by a later ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = wide_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sliced = self.body[:3](x)  # a FusedSequential too: one block ending without ReLU
        kept = []
        for layer in self.body:
            x = layer(x)
            kept.append(x)
        return x + kept[2][:, :5] + sliced[:, 5:10]


@pytest.mark.parametrize("per_point", [True, False])  # both fast paths: point by point, layer by layer
def test_a_model_that_reads_inside_the_sequential_gets_each_layers_output(monkeypatch, per_point):
    calls = counted_onednn(monkeypatch, per_point_faster=per_point)
    models = [seeded(KeepsHidden, seed) for seed in (6, 7)]
    data = (torch.randn(67, 19), torch.randint(0, 5, (67,)))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(5, 2, seed=9))
    assert bool(calls) == per_point  # the slice ran as a block


def test_the_layer_by_layer_path_where_it_timed_faster(monkeypatch):
    calls = counted_onednn(monkeypatch, per_point_faster=False)
    models = [seeded(wide_mlp, seed) for seed in (1, 2)]
    assert_fast_equals_plain_and_loop(models, (torch.randn(67, 19), torch.randint(0, 5, (67,))),
                                      coefficient_rows(3, 2, seed=11))
    assert not calls and len(linear_block._faster_per_point) == 1


def test_the_timed_choice_runs_both_ways_once_per_shape(monkeypatch):
    monkeypatch.setattr(linear_block, "_faster_per_point", {})
    timed = []
    best_seconds = linear_cpu.best_seconds
    monkeypatch.setattr(linear_cpu, "best_seconds",
                        lambda runs, *args: timed.append(runs[0].__name__) or best_seconds(runs, *args))
    models = [seeded(wide_mlp, seed) for seed in (1, 2)]
    data = (torch.randn(67, 19), torch.randint(0, 5, (67,)))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(3, 2, seed=12))
    evaluate(models[0], models, coefficient_rows(4, 2, seed=13), data, progress=False)
    assert timed.count("_per_point") == 1  # the block's two ways, timed on its first call only


def test_a_hooked_relu_runs_on_its_own(monkeypatch):
    seen = []
    models = [seeded(wide_mlp, seed) for seed in (1, 2)]
    models[0][1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    view = SubspaceView(models[0], Basis.from_members(models))
    assert [type(step) for step in view.net.steps[:2]] == [type(view.net[0]), nn.ReLU]
    data = (torch.randn(67, 19), torch.randint(0, 5, (67,)))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(3, 2, seed=10))
    assert seen
