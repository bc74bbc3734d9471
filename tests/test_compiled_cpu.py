"""The compiled CPU kernels (`cpu_kernels.py`) against float64 references on odd shapes, non-finite values and
ties; the engine with them taken, against the plain path and a per-point loop; their load after TORCH_SECONDS of evaluations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_loss_and_error, mlp, plain_loop, seeded, settle_batchnorm
from modeconn_fast.background_load import BackgroundLoad
from modeconn_fast import evaluate
from modeconn_fast.engine import compiled_cpu, mlp_metrics
from modeconn_fast.engine.conv_block import ConvBlock, SampleMajorMaps, _moments
from test_conv_block import members_and_data
from test_engine_fast import (METRICS, assert_fast_equals_plain_and_loop, coefficient_rows, convex_rows,
                              test_cnn_with_batchnorm_fast_path_equals_plain_path_and_loop,
                              test_conv1d_layernorm_and_embedding_fast_paths_equal_plain_path_and_loop,
                              test_fallback_fast_path_equals_plain_path_and_loop)


real_kernels = compiled_cpu.kernels  # before conftest's fixture hides them


@pytest.fixture
def kernels():
    assert compiled_cpu.wait()
    return real_kernels()


@pytest.fixture
def kernel_calls(kernels, monkeypatch):
    """The kernels taken by the engine wherever they apply (no torch rows needed first): the names called."""
    calls = []
    for name in ("cross_entropy_sums", "mix_pool_block", "mix_of_three_pool_block", "pool_block", "column_statistics",
                 "mlp_cross_entropy_sums", "pool_linear_cross_entropy_sums"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
    monkeypatch.setattr(compiled_cpu, "kernels", lambda: kernels)
    return calls


def cross_entropy_sums(kernels, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss, wrong = torch.empty(logits.shape[0], dtype=torch.float64), torch.empty(logits.shape[0], dtype=torch.int64)
    kernels.cross_entropy_sums(logits.numpy(), targets.numpy(), loss.numpy(), wrong.numpy())
    return loss, wrong


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loss sums and wrong arg-max counts per point."""
    points, rows, classes = logits.shape
    flat = logits.double().reshape(-1, classes)
    losses = F.cross_entropy(flat, targets.repeat(points), reduction="none").reshape(points, rows)
    wrong = (flat.argmax(dim=1).reshape(points, rows) != targets).sum(dim=1)
    return losses.sum(dim=1), wrong


@pytest.mark.parametrize("points,rows,classes", [(3, 37, 7), (2, 301, 10), (1, 513, 1), (4, 5, 2), (2, 260, 15)])
def test_cross_entropy_equals_float64_reference_on_odd_shapes(kernels, points, rows, classes):
    generator = torch.Generator().manual_seed(rows)
    padded = torch.randn(points, rows, classes + 3, generator=generator) * 6  # strided: every row padded
    logits = padded[:, :, 1:classes + 1]
    logits[0, :3] = 0.5  # rows of equal logits: arg-max takes the first
    targets = torch.randint(0, classes, (rows,), generator=generator)
    loss, wrong = cross_entropy_sums(kernels, logits, targets)
    expected_loss, expected_wrong = reference(logits, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6 * rows)
    assert torch.equal(wrong, expected_wrong)


def test_cross_entropy_on_far_apart_logits_and_ties(kernels):
    """Logits 200 apart (exp underflows: the clamp), a tie between classes 2 and 4, -inf at a non-target class."""
    logits = torch.tensor([[[0.0, -200.0, 3.0, 1.0, 3.0], [150.0, -50.0, 0.0, float("-inf"), 1.0]]])
    targets = torch.tensor([4, 0])
    loss, wrong = cross_entropy_sums(kernels, logits, targets)
    expected_loss, expected_wrong = reference(logits, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert torch.equal(wrong, expected_wrong) and int(wrong) == 1  # argmax 2 ≠ 4; 0 = 0


def test_cross_entropy_gives_nan_or_inf_where_torch_does(kernels):
    inf, nan = float("inf"), float("nan")
    rows = [[0.0, 1.0, nan], [inf, 1.0, 2.0], [-inf, -inf, -inf], [-inf, 1.0, 2.0], [0.0, 1.0, 2.0]]
    logits = torch.tensor(rows).unsqueeze(1)  # five points of one row each
    targets = torch.tensor([0])
    loss, _ = cross_entropy_sums(kernels, logits, targets)
    expected, _ = reference(logits, targets)
    assert torch.equal(loss.isnan(), expected.isnan()) and loss[:3].isnan().all()
    assert loss[3] == expected[3] == inf and torch.isclose(loss[4], expected[4])


def test_engine_with_the_kernel_equals_plain_path_and_loop(kernel_calls):
    models = [seeded(mlp, seed) for seed in (1, 2, 3)]
    data = [(torch.randn(300, 19), torch.randint(0, 5, (300,))), (torch.randn(41, 19), torch.randint(0, 5, (41,)))]
    coeffs = coefficient_rows(9, 3, seed=3)
    assert_fast_equals_plain_and_loop(models, data, coeffs)
    assert set(kernel_calls) == {"cross_entropy_sums"}  # the fast run took it
    kernel_calls.clear()
    plain = evaluate(models[0], models, coeffs, data, fast=False)  # loss and error only: the kernel gives both
    assert not kernel_calls
    assert_same_loss_and_error(evaluate(models[0], models, coeffs, data), plain)
    assert kernel_calls


def mlp_reference(first: torch.Tensor, first_relu: bool, coeffs: torch.Tensor, layers: list[tuple],
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loss sums and wrong counts per point of the MLP `mlp_cross_entropy_sums` computes: first [K, N, D1]
    per-basis outputs; layers: (stacked weight [K, Dout, Din], stacked bias [K, Dout], relu)."""
    losses, wrong = [], []
    for c in coeffs.double():
        h = torch.einsum("k,knd->nd", c, first.double())
        h = h.relu() if first_relu else h
        for weight, bias, relu in layers:
            h = h @ torch.einsum("k,kij->ij", c, weight.double()).T + c @ bias.double()
            h = h.relu() if relu else h
        losses.append(F.cross_entropy(h, targets, reduction="sum"))
        wrong.append((h.argmax(dim=1) != targets).sum())
    return torch.stack(losses), torch.stack(wrong)


@pytest.mark.parametrize("widths,relus,rows,bases,points", [
    ((7, 5, 9, 3), (True, True, False), 37, 3, 5),
    ((13, 6, 11, 4, 2), (False, True, False, False), 300, 2, 3),
    ((3, 8, 15), (True, False), 256, 4, 1),
])
def test_mlp_cross_entropy_equals_float64_reference_on_odd_shapes(kernels, widths, relus, rows, bases, points):
    """Widths that are not multiples of the kernel's four inputs per pass, rows around its block of ROWS, NaN at
    one point's logits (a NaN first-layer output reaches every class)."""
    generator = torch.Generator().manual_seed(rows)
    first = torch.randn(bases, rows, widths[1], generator=generator)
    layers = [(torch.randn(bases, d_out, d_in, generator=generator) / d_in ** 0.5,
               torch.randn(bases, d_out, generator=generator), relu)
              for d_in, d_out, relu in zip(widths[1:-1], widths[2:], relus[1:])]
    coeffs = torch.rand(points, bases, generator=generator) * 1.6 - 0.3
    if points > 1:
        first[1, 3, 0] = float("nan")
        coeffs[1, 1] = 0.5  # NaN · 0 would be NaN too; the other points have nonzero weights on member 1 as well
    targets = torch.randint(0, widths[-1], (rows,), generator=generator)
    weights = torch.cat([w.flatten(1) for w, _, _ in layers], dim=1).contiguous()
    biases = torch.cat([b for _, b, _ in layers], dim=1).contiguous()
    table, at_w, at_b = [], 0, 0
    for weight, _, relu in layers:
        table.append((at_w, at_b, weight.shape[1], weight.shape[2], int(relu)))
        at_w, at_b = at_w + weight[0].numel(), at_b + weight.shape[1]
    loss, wrong = torch.empty(points, dtype=torch.float64), torch.empty(points, dtype=torch.int64)
    kernels.mlp_cross_entropy_sums(first.transpose(1, 2).contiguous().numpy(), relus[0], coeffs.numpy(),
                                   weights.numpy(), biases.numpy(), torch.tensor(table).numpy(), targets.numpy(),
                                   loss.numpy(), wrong.numpy())
    expected_loss, expected_wrong = mlp_reference(first, relus[0], coeffs, layers, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5 * rows, equal_nan=True)
    assert torch.equal(loss.isnan(), expected_loss.isnan()) and loss.isnan().any() == (points > 1)
    finite = ~loss.isnan()
    assert torch.equal(wrong[finite], expected_wrong[finite])


def relu_mlp(bias: bool = True) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(19, 23), torch.nn.ReLU(), torch.nn.Linear(23, 17, bias=bias),
                               torch.nn.ReLU(), torch.nn.Linear(17, 5))


@pytest.mark.parametrize("bias", [True, False])
def test_engine_with_the_fused_mlp_equals_plain_path_and_loop(kernel_calls, bias):
    """Linear → ReLU → … → Linear through `mlp_metrics.py`, batches of 300 and 41 rows, points off the hull."""
    models = [seeded(lambda: relu_mlp(bias), seed) for seed in (1, 2, 3)]
    data = [(torch.randn(300, 19), torch.randint(0, 5, (300,))), (torch.randn(41, 19), torch.randint(0, 5, (41,)))]
    coeffs = coefficient_rows(9, 3, seed=4)
    fast = evaluate(models[0], models, coeffs, data, progress=False)
    assert set(kernel_calls) == {"mlp_cross_entropy_sums"}
    kernel_calls.clear()
    plain = evaluate(models[0], models, coeffs, data, fast=False, progress=False)
    assert not kernel_calls
    assert_same_loss_and_error(fast, plain)
    assert_same_loss_and_error(fast, plain_loop(models[0], models, coeffs, data))


def test_fused_mlp_is_left_where_it_does_not_apply(kernel_calls):
    """Other metrics, a custom loss or targets outside the classes take the view's path, with the same numbers;
    a member with NaN weights gives NaN at the points that use it, as the plain path."""
    models = [seeded(relu_mlp, seed) for seed in (1, 2, 3)]
    inputs, targets = torch.randn(50, 19), torch.randint(0, 5, (50,))
    coeffs = coefficient_rows(6, 3, seed=5)
    assert_fast_equals_plain_and_loop(models, (inputs, targets), coeffs)  # nll and brier asked too
    evaluate(models[0], models, coeffs, (inputs, targets), loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    assert "mlp_cross_entropy_sums" not in kernel_calls
    halved = evaluate(models[0], models, coeffs, (inputs, targets), output=lambda logits: logits / 2, progress=False)
    assert "mlp_cross_entropy_sums" not in kernel_calls  # the picked output is not the last layer's
    halved_plain = evaluate(models[0], models, coeffs, (inputs, targets), output=lambda logits: logits / 2,
                            fast=False, progress=False)
    assert_same_loss_and_error(halved, halved_plain)
    with torch.no_grad():
        models[2][2].weight[0, 0] = float("nan")
    coeffs[0, 2] = 0.0
    fast = evaluate(models[0], models, coeffs, (inputs, targets), progress=False)
    assert "mlp_cross_entropy_sums" in kernel_calls
    plain = evaluate(models[0], models, coeffs, (inputs, targets), fast=False, progress=False)
    assert fast["loss"][1:].isnan().all() and not fast["loss"][0].isnan()
    for name in ("loss", "error"):
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7, equal_nan=True)


def test_a_long_fused_mlp_call_waits_for_the_kernels(kernels, monkeypatch):
    """Before the kernels are loaded a short call runs torch's path; one of WAIT_MACS or more waits for the load."""
    loaded, calls = [], []
    monkeypatch.setattr(compiled_cpu, "wait", lambda: loaded.append(1) or True)
    monkeypatch.setattr(compiled_cpu, "kernels", lambda: kernels if loaded else None)
    fused = kernels.mlp_cross_entropy_sums
    monkeypatch.setattr(kernels, "mlp_cross_entropy_sums", lambda *args: calls.append(1) or fused(*args))
    models = [seeded(relu_mlp, seed) for seed in (1, 2, 3)]
    data = (torch.randn(30, 19), torch.randint(0, 5, (30,)))
    coeffs = coefficient_rows(4, 3, seed=6)
    multiply_adds = 4 * 30 * (19 * 23 + 23 * 17 + 17 * 5)
    monkeypatch.setattr(mlp_metrics, "WAIT_MACS", multiply_adds + 1)
    short = evaluate(models[0], models, coeffs, data, progress=False)
    assert not loaded and not calls
    monkeypatch.setattr(mlp_metrics, "WAIT_MACS", multiply_adds)
    long = evaluate(models[0], models, coeffs, data, progress=False)
    assert loaded and calls
    assert_same_loss_and_error(long, short)


def test_the_load_starts_only_after_a_second_of_evaluations(monkeypatch):
    """Jobs shorter than TORCH_SECONDS in all neither take nor load the kernels; time inside evaluations counts."""
    started, clock = [], [100.0]
    monkeypatch.setattr(compiled_cpu, "_loading", BackgroundLoad(lambda: None, "never started"))
    monkeypatch.setattr(compiled_cpu, "_seconds", [0.0])
    monkeypatch.setattr(compiled_cpu, "load", lambda: started.append(1))
    monkeypatch.setattr(compiled_cpu.time, "perf_counter", lambda: clock[0])
    for _ in range(2):
        with compiled_cpu.counting(), compiled_cpu.counting():  # nested: counted once
            clock[0] += 0.45
            assert real_kernels() is None
    clock[0] += 5.0  # outside evaluations: not counted
    assert real_kernels() is None and not started
    with compiled_cpu.counting():
        clock[0] += 0.1
        assert real_kernels() is None
    assert started


def test_evaluate_counts_its_time(monkeypatch):
    monkeypatch.setattr(compiled_cpu, "_seconds", [0.0])
    models = [seeded(mlp, seed) for seed in (1, 2)]
    evaluate(models[0], models, coefficient_rows(3, 2, seed=1), (torch.randn(7, 19), torch.randint(0, 5, (7,))))
    assert 0.0 < compiled_cpu._seconds[0] < 60.0


def pooled_reference(per_basis: torch.Tensor, coeffs: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     relu: bool) -> torch.Tensor:
    """float64: mix [P, N, H, W, C], 2×2 max-pool (NaN propagating), affine, ReLU -> [P·N, C, H/2, W/2]."""
    mixed = torch.einsum("pk,knhwc->pnhwc", coeffs.double(), per_basis.double())
    points, samples, height, width, channels = mixed.shape
    mixed = mixed[:, :, : height // 2 * 2, : width // 2 * 2]
    windows = mixed.reshape(points, samples, height // 2, 2, width // 2, 2, channels)
    top = torch.maximum(torch.maximum(windows[:, :, :, 0, :, 0], windows[:, :, :, 0, :, 1]),
                        torch.maximum(windows[:, :, :, 1, :, 0], windows[:, :, :, 1, :, 1]))
    y = top * scale.double()[:, None, None, None] + shift.double()[:, None, None, None]
    y = torch.relu(y) if relu else y
    return y.permute(0, 1, 4, 2, 3).reshape(points * samples, channels, height // 2, width // 2)


@pytest.mark.parametrize("bases,samples,height,width,channels,points,relu",
                         [(3, 5, 8, 8, 16, 4, True), (2, 3, 7, 5, 3, 3, False), (4, 2, 4, 9, 17, 1, True)])
def test_mix_pool_block_equals_float64_reference_on_odd_shapes(kernels, bases, samples, height, width, channels,
                                                               points, relu):
    generator = torch.Generator().manual_seed(channels)
    per_basis = torch.randn(bases, samples, height, width, channels, generator=generator)
    per_basis[0, 0, 1, 1, 0] = float("nan")  # the window (0, 0) of channel 0, sample 0, at every point
    coeffs = torch.rand(points, bases, generator=generator) * 1.6 - 0.3
    scale = torch.rand(points, channels, generator=generator)
    scale[0, 0] = 0.0
    shift = torch.randn(points, channels, generator=generator)
    expected = pooled_reference(per_basis, coeffs, scale, shift, relu)
    for target in outputs(points, samples, channels, height // 2, width // 2):
        kernels.mix_pool_block(per_basis.numpy(), coeffs.numpy(), scale.numpy(), shift.numpy(), relu, target.numpy())
        out = target.reshape(points * samples, channels, height // 2, width // 2)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert out[::samples, 0, 0, 0].isnan().all()


@pytest.mark.parametrize("samples,height,width,channels,points,relu",
                         [(5, 8, 8, 16, 4, True), (3, 7, 5, 3, 3, False), (2, 4, 9, 17, 1, True), (1, 2, 2, 1, 2, True)])
def test_mix_of_three_pool_block_equals_float64_reference_on_odd_shapes(kernels, samples, height, width, channels,
                                                                        points, relu):
    generator = torch.Generator().manual_seed(channels + 100)
    per_basis = torch.randn(3, samples, height, width, channels, generator=generator)
    per_basis[1, 0, 1, 1, 0] = float("nan")  # the window (0, 0) of channel 0, sample 0, at every point
    coeffs = torch.rand(points, 3, generator=generator) * 1.6 - 0.3
    scale = torch.rand(points, channels, generator=generator)
    scale[0, 0] = 0.0
    shift = torch.randn(points, channels, generator=generator)
    expected = pooled_reference(per_basis, coeffs, scale, shift, relu)
    memory = torch.full((samples, height // 2, width // 2, points, channels), 7.0)  # sample-major [N, H', W', P, C]
    kernels.mix_of_three_pool_block(per_basis.numpy(), coeffs.numpy(), scale.numpy(), shift.numpy(), relu,
                                    memory.numpy())
    out = memory.permute(3, 0, 4, 1, 2).reshape(points * samples, channels, height // 2, width // 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[::samples, 0, 0, 0].isnan().all()


def outputs(points: int, samples: int, channels: int, height: int, width: int) -> list[torch.Tensor]:
    """Poisoned outputs [P, N, C, H, W] for a kernel: point-major NCHW memory, and sample-major channels-last
    memory [N, H, W, P, C] (strided)."""
    return [torch.full((points, samples, channels, height, width), 7.0),
            torch.full((samples, height, width, points, channels), 7.0).permute(3, 0, 4, 1, 2)]


@pytest.mark.parametrize("samples,height,width,points,channels,relu", [(3, 4, 4, 5, 32, True), (2, 7, 5, 3, 3, False)])
def test_pool_block_equals_float64_reference_on_odd_shapes(kernels, samples, height, width, points, channels, relu):
    generator = torch.Generator().manual_seed(height)
    maps = torch.randn(samples, height, width, points * channels, generator=generator)  # [N, H, W, P·C]
    maps[0, 1, 0, 0] = float("nan")  # the window (0, 0) of point 0, channel 0, sample 0
    scale = torch.rand(points, channels, generator=generator)
    shift = torch.randn(points, channels, generator=generator)
    per_point = maps.reshape(samples, height, width, points, channels).permute(3, 0, 1, 2, 4)  # [P, N, H, W, C]
    expected = torch.cat([pooled_reference(per_point[p:p + 1], torch.ones(1, 1), scale[p:p + 1], shift[p:p + 1], relu)
                          for p in range(points)])
    for target in outputs(points, samples, channels, height // 2, width // 2):
        kernels.pool_block(maps.numpy(), scale.numpy(), shift.numpy(), relu, target.numpy())
        out = target.reshape(points * samples, channels, height // 2, width // 2)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert out[0, 0, 0, 0].isnan() and not out[1:, :, 1:].isnan().any()


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_conv_blocks_with_the_kernels_equal_plain_path_and_loop(bn, kernel_calls, monkeypatch):
    """The conv-block test model (odd maps, a grouped convolution) with its first BatchNorm's scales made positive
    (the kernel's case), at points of the members' convex hull; the first block hands the second its output
    sample-major. For loss and error the second block, Flatten and Linear run as one pass to the metrics
    (`conv_metrics.py`); with other metrics too, the logits come from the pooled maps."""
    handed = []
    grouped = ConvBlock._grouped_convolution
    monkeypatch.setattr(ConvBlock, "_grouped_convolution",
                        lambda self, x: handed.append(isinstance(x, SampleMajorMaps)) or grouped(self, x))
    members, inputs, targets = members_and_data("two_blocks", seed=3)
    for member in members:
        with torch.no_grad():
            member[1].weight.abs_()
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.3, 0.6], [0.0, 0.0, 1.0], [0.4, 0.2, 0.4]])
    batches = [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 45, 16)]
    bn_batches = [x for x, _ in batches]
    options = dict(bn=bn, bn_data=bn_batches if bn == "recompute" else None, progress=False)
    fast = evaluate(members[0], members, coeffs, batches, **options)
    assert {"mix_of_three_pool_block", "pool_linear_cross_entropy_sums"} <= set(kernel_calls) and handed and all(handed)
    # only the recomputation's first forward pools (it runs to the end, to learn where the statistics end)
    assert kernel_calls.count("pool_block") == (bn == "recompute")
    assert ("column_statistics" in kernel_calls) == (bn == "recompute")
    kernel_calls.clear()
    more = evaluate(members[0], members, coeffs, batches, metrics=METRICS, **options)
    assert "pool_block" in kernel_calls and "pool_linear_cross_entropy_sums" not in kernel_calls
    kernel_calls.clear()
    plain = evaluate(members[0], members, coeffs, batches, fast=False, **options)
    plain_more = evaluate(members[0], members, coeffs, batches, metrics=METRICS, fast=False, **options)
    assert not kernel_calls
    assert_same_loss_and_error(fast, plain)
    assert_same_loss_and_error(fast, plain_loop(members[0], members, coeffs, batches, bn=bn, bn_batches=bn_batches))
    for name in METRICS:
        torch.testing.assert_close(more[name], plain_more[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_cnn_with_batchnorm_and_the_kernels_equals_plain_path_and_loop(bn, kernel_calls):
    test_cnn_with_batchnorm_fast_path_equals_plain_path_and_loop(bn)
    assert "mix_pool_block" in kernel_calls


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_other_engine_models_with_the_kernels_equal_plain_path_and_loop(kernel_calls):
    test_conv1d_layernorm_and_embedding_fast_paths_equal_plain_path_and_loop()
    test_fallback_fast_path_equals_plain_path_and_loop()
    assert "cross_entropy_sums" in kernel_calls


@pytest.mark.parametrize("shape", [(3, 128, 8, 8, 16), (2, 5, 3, 7, 3), (4, 1, 2, 2, 1)])
def test_moments_equal_the_float64_torch_path_on_odd_shapes(kernels, shape, monkeypatch):
    generator = torch.Generator().manual_seed(shape[1])
    per_basis = torch.randn(shape, generator=generator) * 3 + 5  # far from centred: the two passes matter
    expected = _moments(per_basis)  # torch's path: conftest hides the kernels
    monkeypatch.setattr(compiled_cpu, "kernels", lambda: kernels)
    mean, covariance = _moments(per_basis)
    torch.testing.assert_close(mean, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(covariance, expected[1], rtol=1e-10, atol=1e-12)
    assert torch.equal(covariance, covariance.transpose(1, 2))


@pytest.mark.parametrize("rows,columns", [(37, 23), (2048, 352), (2, 1)])
def test_column_statistics_equal_float64_reference_on_odd_shapes(kernels, rows, columns):
    generator = torch.Generator().manual_seed(rows)
    values = torch.randn(rows, columns, generator=generator) * 3 + 40  # far from centred: the two passes matter
    mean, var = torch.full((columns,), 7.0), torch.full((columns,), 7.0)
    kernels.column_statistics(values.numpy(), mean.numpy(), var.numpy())
    torch.testing.assert_close(mean.double(), values.double().mean(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), values.double().var(dim=0, unbiased=False), rtol=1e-5, atol=0)


@pytest.mark.parametrize("samples,height,width,points,channels,classes,relu",
                         [(3, 4, 4, 5, 32, 10, True), (300, 5, 7, 3, 3, 4, False), (1, 2, 2, 2, 1, 1, True)])
def test_pool_linear_cross_entropy_equals_float64_reference_on_odd_shapes(kernels, samples, height, width, points,
                                                                          channels, classes, relu):
    """Pooling, affine map, ReLU, per-point Linear (weights in channels-last feature order) and cross-entropy sums of
    a grouped convolution's sample-major output, against float64 torch with nn.Flatten's order; a NaN reaches its
    sample's loss at its point only."""
    generator = torch.Generator().manual_seed(samples + classes)
    maps = torch.randn(samples, height, width, points * channels, generator=generator)  # [N, H, W, P·C]
    maps[0, 1, 0, 0] = float("nan")  # the window (0, 0) of point 0, channel 0, sample 0
    scale = torch.rand(points, channels, generator=generator)
    shift = torch.randn(points, channels, generator=generator)
    features = channels * (height // 2) * (width // 2)
    weights = torch.randn(points, classes, features, generator=generator)
    biases = torch.randn(points, classes, generator=generator)
    targets = torch.randint(0, classes, (samples,), generator=generator)
    per_point = maps.reshape(samples, height, width, points, channels).permute(3, 0, 1, 2, 4)  # [P, N, H, W, C]
    pooled = torch.cat([pooled_reference(per_point[p:p + 1], torch.ones(1, 1), scale[p:p + 1], shift[p:p + 1], relu)
                        for p in range(points)]).reshape(points, samples, features)
    logits = torch.baddbmm(biases.double()[:, None], pooled, weights.double().transpose(1, 2))  # [P, N, classes]
    loss, wrong = torch.full((points,), 7.0, dtype=torch.float64), torch.full((points,), 7, dtype=torch.int64)
    channels_last = weights.reshape(points, classes, channels, height // 2, width // 2).permute(0, 1, 3, 4, 2)
    kernels.pool_linear_cross_entropy_sums(maps.numpy(), scale.numpy(), shift.numpy(), relu,
                                           channels_last.reshape(points, classes, -1).contiguous().numpy(),
                                           biases.numpy(), targets.numpy(), loss.numpy(), wrong.numpy())
    expected_loss, expected_wrong = reference(logits[1:], targets)
    assert loss[0].isnan()
    torch.testing.assert_close(loss[1:], expected_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(wrong[1:], expected_wrong)


@pytest.mark.parametrize("both_signs", [False, True])
def test_cnn_tail_equals_plain_path_and_loop_and_is_left_where_pooling_cannot_run_first(kernel_calls, both_signs):
    """A CNN on odd maps with BatchNorm recomputed, points in the hull: the compiled tail where the last BatchNorm's
    scales are ≥ 0; with scales of both signs (pooling must wait for the affine map) it declines and the forward
    runs on to the logits. Either way the numbers equal the plain path's and a per-point loop's."""
    def cnn() -> torch.nn.Module:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(2, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(5, 7, 3, padding=1), torch.nn.BatchNorm2d(7), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(7 * 2 * 1, 4))
        with torch.no_grad():
            model[5].weight.uniform_(-1, 1) if both_signs else model[5].weight.uniform_(0.5, 1)
        return model
    inputs, targets = torch.randn(29, 2, 9, 6), torch.randint(0, 4, (29,))
    members = [settle_batchnorm(seeded(cnn, seed), inputs) for seed in (1, 2, 3)]
    coeffs = convex_rows(5, 3, seed=8)
    bn_batches = [inputs[:16], inputs[16:]]
    options = dict(bn="recompute", bn_data=bn_batches, progress=False)
    fast = evaluate(members[0], members, coeffs, (inputs, targets), **options)
    assert ("pool_linear_cross_entropy_sums" in kernel_calls) == (not both_signs)
    plain = evaluate(members[0], members, coeffs, (inputs, targets), fast=False, **options)
    assert_same_loss_and_error(fast, plain)
    assert_same_loss_and_error(fast, plain_loop(members[0], members, coeffs, [(inputs, targets)], bn="recompute",
                                                bn_batches=bn_batches))
