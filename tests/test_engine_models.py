"""Models that stress the subspace view: shared layers, aliases, batch-axis tricks, modules vmap cannot batch.

Each must give what a plain loop gives (copy the model, load the mixed weights, forward).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import assert_same_loss_and_error, mlp, model_at, plain_loop, seeded
from modeconn_fast import Basis, SubspaceView, evaluate, interpolate
from modeconn_fast.engine.batches import Batches
from modeconn_fast.engine.chunks import plan_chunks

COEFFS = torch.tensor([[1.0, 0.0], [0.6, 0.4], [-0.2, 1.2], [0.0, 1.0]])


def assert_matches_loop(model_factory, inputs, targets, *, expect_warning: bool = False, **options):
    models = [seeded(model_factory, seed) for seed in (1, 2)]
    if expect_warning:
        with pytest.warns(UserWarning, match="whole model per point"):
            result = evaluate(models[0], models, COEFFS, (inputs, targets), **options)
    else:
        result = evaluate(models[0], models, COEFFS, (inputs, targets), **options)
    assert_same_loss_and_error(result, plain_loop(models[0], models, COEFFS, [(inputs, targets)]))


class Siamese(nn.Module):
    """One encoder applied to two inputs of the same shape."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        left, right = pair[:, 0], pair[:, 1]
        return self.head(torch.cat([self.encoder(left), self.encoder(right)], dim=1))


class TwoInputs(Siamese):
    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(torch.cat([self.encoder(left), self.encoder(right)], dim=1))


class Aliased(nn.Module):
    """The same Linear registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.again = self.shared
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.again(torch.relu(self.shared(x)))))


class SequenceFirst(nn.Module):
    """Moves the batch axis ([N, T, D] -> [T, N, D]) but keeps samples apart: the fast path stays right."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)  # [T, N, D]
        return self.out((h - h.mean(dim=0, keepdim=True)).cumsum(dim=0)[-1])


class FlipAveraged(nn.Module):
    """Test-time augmentation by concatenating along the batch axis, then averaging the two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.body(torch.cat([x, x.flip(-1)], dim=0))
        return (both[: len(x)] + both[len(x):]) / 2


class BatchCentred(nn.Module):
    """Reduces along the batch axis."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.out(h - h.mean(dim=0))


class TiedHead(nn.Module):
    """Reads a swapped layer's weight directly (weight tying by attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return h @ self.embed.weight.T


class Recurrent(nn.Module):
    """nn.LSTM, which vmap cannot batch: its module runs point by point."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.out(out[:, -1])


class KeywordAttention(nn.Module):
    """A module the view does not know, called with keyword arguments and returning None in a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, weights = self.attention(x, x, x, need_weights=False)
        assert weights is None
        return self.out(h.mean(dim=1))


class FlatTokens(nn.Module):
    """BatchNorm1d and a 1×1 convolution over tokens folded into the batch axis: [N·T, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        h = self.norm(x.reshape(n * t, c)).reshape(n, t, c)
        return self.out(h.mean(dim=1))


def test_one_layer_on_two_inputs_of_the_same_shape():
    pairs, targets = torch.randn(20, 2, 8), torch.randint(0, 3, (20,))
    assert_matches_loop(Siamese, pairs, targets, memory_budget=4_000)
    models = [seeded(TwoInputs, seed) for seed in (1, 2)]
    left, right = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    result = evaluate(models[0], models, COEFFS, ((left, right), targets), memory_budget=4_000)
    expected = [F.cross_entropy(m(left, right), targets) for m in (_at(models, row) for row in COEFFS)]
    torch.testing.assert_close(result["loss"], torch.stack(expected).double(), rtol=1e-5, atol=1e-7)


def _at(models, row):
    return model_at(models[0], models, row).eval()


def test_a_module_under_two_names_is_converted_everywhere():
    assert_matches_loop(Aliased, torch.randn(20, 8), torch.randint(0, 3, (20,)))


def test_forward_code_that_moves_the_batch_axis_but_keeps_samples_apart():
    assert_matches_loop(SequenceFirst, torch.randn(20, 5, 8), torch.randint(0, 3, (20,)))


@pytest.mark.parametrize("factory", [FlipAveraged, BatchCentred])
def test_forward_code_that_mixes_samples_along_the_batch_axis_runs_per_point(factory):
    assert_matches_loop(factory, torch.randn(20, 8), torch.randint(0, 3, (20,)), expect_warning=True)


def test_forward_code_reading_a_swapped_layer_runs_per_point():
    assert_matches_loop(TiedHead, torch.randint(0, 10, (20, 4)), torch.randint(0, 10, (20,)), expect_warning=True)


def test_modules_vmap_cannot_batch_run_point_by_point():
    assert_matches_loop(Recurrent, torch.randn(20, 5, 8), torch.randint(0, 3, (20,)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keyword_arguments_and_none_outputs_of_unknown_modules():
    assert_matches_loop(KeywordAttention, torch.randn(20, 5, 8), torch.randint(0, 3, (20,)))


def test_batchnorm_over_tokens_folded_into_the_batch_axis():
    models = [seeded(FlatTokens, seed) for seed in (1, 2)]
    inputs, targets = torch.randn(20, 5, 8), torch.randint(0, 3, (20,))
    result = evaluate(models[0], models, COEFFS, (inputs, targets), bn="recompute", bn_data=inputs)
    expected = plain_loop(models[0], models, COEFFS, [(inputs, targets)], bn="recompute", bn_batches=[inputs])
    torch.testing.assert_close(result["loss"], expected["loss"], rtol=1e-5, atol=1e-7)


def test_batchnorm_without_running_statistics_sees_the_whole_tensor_dataset():
    def net():
        return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU(), nn.Linear(6, 3))

    inputs, targets = torch.randn(300, 8), torch.randint(0, 3, (300,))
    assert_matches_loop(net, inputs, targets, memory_budget=60_000)


def test_low_precision_logits_are_summed_in_float64():
    models = [seeded(mlp, seed).to(torch.bfloat16) for seed in (1, 2)]
    inputs, targets = torch.randn(64, 19, dtype=torch.bfloat16), torch.randint(0, 5, (64,))
    result = evaluate(models[0], models, COEFFS, (inputs, targets))
    expected = [F.cross_entropy(_at(models, row)(inputs).float(), targets) for row in COEFFS]
    torch.testing.assert_close(result["loss"], torch.stack(expected).double(), rtol=2e-2, atol=1e-3)


def test_nan_in_one_member_spares_the_points_that_do_not_use_it():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    with torch.no_grad():
        b[2].weight[0, 0] = float("nan")
    data = (torch.randn(16, 19), torch.randint(0, 5, (16,)))
    with pytest.warns(UserWarning, match="nonzero coefficient"):
        path = interpolate(a, b, data, points=3)
    assert torch.isfinite(path.loss[0]) and torch.isnan(path.loss[1:]).all() and torch.isnan(path.error[1:]).all()
    torch.testing.assert_close(path.loss[0], F.cross_entropy(a(data[0]), data[1]).double().detach())


def test_regression_models_take_a_path_of_losses_only():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    data = (torch.randn(16, 19), torch.randn(16, 5))
    path = interpolate(a, b, data, points=5, metrics=("loss",), loss_fn=nn.MSELoss(reduction="none"))
    assert path.error is None and path.loss.shape == (5,)
    with pytest.raises(ValueError, match="no error values"):
        path.barrier("error")


def test_bn_data_may_be_inputs_alone():
    def net():
        return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

    models = [seeded(net, seed) for seed in (1, 2)]
    data, bn_inputs = (torch.randn(20, 8), torch.randint(0, 3, (20,))), torch.randn(30, 8)
    labels = torch.zeros(30, dtype=torch.long)
    for alone, given in ((bn_inputs, (bn_inputs, labels)),
                         (DataLoader(TensorDataset(bn_inputs), batch_size=12), DataLoader(TensorDataset(bn_inputs, labels), batch_size=12))):
        result = evaluate(models[0], models, COEFFS, data, bn_data=alone)
        torch.testing.assert_close(result["loss"], evaluate(models[0], models, COEFFS, data, bn_data=given)["loss"])


def test_chunks_are_of_even_sizes():
    models = [seeded(mlp, seed) for seed in (1, 2)]
    view = SubspaceView(models[0], Basis.from_members(models))
    coeffs = torch.rand(21, 2)
    data = Batches((torch.randn(10, 19), torch.randint(0, 5, (10,))))
    chunks = plan_chunks(view, coeffs, [data], None, memory_budget=10 * 4 * 92 * 5 + 1, device=torch.device("cpu"))
    sizes = [c.stop - c.start for c in chunks]
    assert sum(sizes) == 21 and max(sizes) - min(sizes) <= 1 and chunks[0].start == 0 and chunks[-1].stop == 21


def test_batches_of_three_items_are_refused():
    models = [seeded(mlp, seed) for seed in (1, 2)]
    loader = [(torch.randn(4, 19), torch.randn(4, 19), torch.randint(0, 5, (4,)))]
    with pytest.raises(TypeError, match=r"\(\(x1, x2\), targets\)"):
        evaluate(models[0], models, COEFFS, loader)


def test_a_basis_of_another_dtype_is_named():
    models = [seeded(mlp, seed) for seed in (1, 2)]
    basis = Basis.from_members(models).to(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0\.weight' is torch\.float64 .* torch\.float32"):
        evaluate(models[0], basis, COEFFS, (torch.randn(4, 19), torch.randint(0, 5, (4,))))


@pytest.mark.parametrize("factory, inputs, skips", [
    (mlp, torch.randn(5, 19), True),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Dropout(0.1), nn.Linear(32, 4)), torch.randn(5, 3, 4, 4), True),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), nn.GELU(), nn.Flatten(1),
                           nn.Linear(24, 2)), torch.randn(5, 3, 6), True),
    (lambda: nn.Sequential(nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)), torch.randn(5, 7), True),
    (lambda: nn.Sequential(nn.Linear(7, 3), nn.Flatten(0)), torch.randn(5, 7), False),  # merges the batch axis
    (lambda: nn.Sequential(nn.Linear(7, 4), nn.Softmax(dim=0)), torch.randn(5, 7), False),  # not a listed module
])
def test_a_sequential_of_known_modules_skips_the_probe_with_the_probes_answer(factory, inputs, skips):
    from modeconn_fast.engine.view import _sequential_reads_shared_rows

    models = [seeded(factory, seed) for seed in (1, 2)]
    view = SubspaceView(models[0], Basis.from_members(models))
    known = _sequential_reads_shared_rows(view.net, (inputs,))
    assert (known is not None) == skips
    if known is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the probe must not fall back to running per point
            view._check_folding(COEFFS[:1], COEFFS[1:3], (inputs[:2],))
        assert view.fallback_names == [] and view.reads_shared_rows_only == (known,)


class _OwnPosition(nn.Module):
    """A position vector held by the root module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(19))
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.pos)


class _Shift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(19))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class _PositionInSubmodule(_OwnPosition):
    """The same function with the vector in a submodule: only that module runs per point."""

    def __init__(self) -> None:
        super().__init__()
        del self.pos
        self.shift = _Shift()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.shift(x))


def test_a_models_own_parameters_are_named_in_a_warning_and_a_submodule_keeps_the_fast_path():
    data = [(torch.randn(6, 19), torch.randint(0, 5, (6,)))]
    for factory, warns in ((_OwnPosition, True), (_PositionInSubmodule, False)):
        models = [seeded(factory, seed) for seed in (1, 2)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate(models[0], models, COEFFS, data)
        messages = [str(w.message) for w in caught]
        assert any("tensors of its own (pos)" in m and "submodule" in m for m in messages) == warns, messages
        assert_same_loss_and_error(result, plain_loop(models[0], models, COEFFS, data))
