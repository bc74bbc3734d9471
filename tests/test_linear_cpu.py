"""The per-point oneDNN linear equals the batched product and a float64 reference; the choice between them is
made only where it may apply, and `plain_only` turns it off."""
from __future__ import annotations

import pytest
import torch

from modeconn_fast import linear_cpu

pytestmark = pytest.mark.skipif(not linear_cpu.ONEDNN, reason="this torch has no oneDNN linear")


@pytest.mark.parametrize("with_bias", [True, False])
def test_per_point_linear_equals_batched_product_and_float64(with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 29, generator=generator)
    weight = torch.randn(3, 23, 29, generator=generator)
    bias = torch.randn(3, 23, generator=generator) if with_bias else None
    expected = x.double() @ weight.double().transpose(1, 2) + (0 if bias is None else bias.double().unsqueeze(1))
    per_point = linear_cpu.per_point_linear(x, weight, bias)
    torch.testing.assert_close(per_point.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_point, linear_cpu.batched_linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_per_point_choice_applies_only_to_large_float32_products_without_gradients(monkeypatch):
    monkeypatch.setattr(linear_cpu, "_faster_per_point", {})
    monkeypatch.setattr(linear_cpu, "best_seconds", lambda runs, *args: [0.0, 1.0])  # per point "faster"
    large = (torch.zeros(2, 64, 512), torch.zeros(2, 512, 512), torch.zeros(2, 512))
    assert linear_cpu.per_point_is_faster(*large)
    assert not linear_cpu.per_point_is_faster(torch.zeros(2, 63, 512), *large[1:])  # below MIN_MACS
    assert not linear_cpu.per_point_is_faster(*(t.double() for t in large))
    with linear_cpu.plain_only(True):
        assert not linear_cpu.per_point_is_faster(*large)
    assert linear_cpu.per_point_is_faster(*large)
    weight = large[1].clone().requires_grad_()
    assert not linear_cpu.per_point_is_faster(large[0], weight, large[2])
    with torch.no_grad():
        assert linear_cpu.per_point_is_faster(large[0], weight, large[2])
