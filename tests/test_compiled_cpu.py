"""The compiled CPU kernels (`cpu_kernels.py`) against float64 references on odd shapes, non-finite values and
ties; the engine with them taken, against the plain path and a per-point loop; their load after TORCH_ROWS."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_loss_and_error, mlp, seeded
from modeconn_fast import evaluate
from modeconn_fast.engine import compiled_cpu
from test_engine_fast import METRICS, assert_fast_equals_plain_and_loop, coefficient_rows


@pytest.fixture
def kernels():
    assert compiled_cpu.wait()
    return compiled_cpu.kernels(0)


@pytest.fixture
def kernel_calls(kernels, monkeypatch):
    """The kernels loaded, and taken for every float32 batch (no torch rows needed first): their calls."""
    calls = []
    for name in ("cross_entropy_sums",):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
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
    assert kernel_calls  # the fast run took it
    kernel_calls.clear()
    plain = evaluate(models[0], models, coeffs, data, fast=False)  # loss and error only: the kernel gives both
    assert not kernel_calls
    assert_same_loss_and_error(evaluate(models[0], models, coeffs, data), plain)
    assert kernel_calls


def test_the_load_starts_only_after_torch_rows(monkeypatch):
    """Before TORCH_ROWS rows on torch's paths the kernels are neither taken nor loaded."""
    started = []
    monkeypatch.setattr(compiled_cpu, "_compiled", [])
    monkeypatch.setattr(compiled_cpu, "_torch_rows", [0])
    monkeypatch.setattr(compiled_cpu, "load", lambda: started.append(1))
    for _ in range(compiled_cpu.TORCH_ROWS // 256 - 1):
        assert compiled_cpu.kernels(256) is None
    assert not started
    assert compiled_cpu.kernels(256) is None
    assert started
