"""The engine's CPU fast paths equal the plain path (`evaluate(..., fast=False)`) and a plain per-point loop:
the one-pass cross-entropy and arg-max for few classes, chunks sized for the allocator, reused input copies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import (SequenceConv, SmallCNN, TokenModel, WithUnknownModules, assert_same_loss_and_error, mlp,
                     plain_loop, seeded, settle_batchnorm)
from modeconn_fast import Basis, SubspaceView, evaluate, linear_cpu, ops_torch
from modeconn_fast.engine import conv_block
from modeconn_fast.engine.batches import Batches
from modeconn_fast.engine.chunks import CPU_MIN_CHUNK, plan_chunks
from modeconn_fast.engine.metrics import MetricSums, check_metrics, small_class_cross_entropy
from modeconn_fast.memory import KEEP_MMAP

METRICS = ("loss", "error", "nll", "brier")


def coefficient_rows(points: int, members: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(points, members, generator=generator) * 1.6 - 0.3


def convex_rows(points: int, members: int, seed: int) -> torch.Tensor:
    """Rows inside the members' convex hull: mixed BatchNorm variances stay positive for bn="eval"."""
    rows = coefficient_rows(points, members, seed).abs() + 0.05
    return rows / rows.sum(dim=1, keepdim=True)


def assert_fast_equals_plain_and_loop(models, data, coeffs, *, bn: str = "eval", bn_batches=(), **options) -> None:
    bn_options = {"bn": bn, "bn_data": [(x, torch.zeros(len(x), dtype=torch.long)) for x in bn_batches] or None}
    fast = evaluate(models[0], models, coeffs, data, metrics=METRICS, **bn_options, **options)
    plain = evaluate(models[0], models, coeffs, data, metrics=METRICS, fast=False, **bn_options, **options)
    for name in METRICS:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7)
    batches = data if isinstance(data, list) else [data]
    assert_same_loss_and_error(fast, plain_loop(models[0], models, coeffs, batches, bn=bn, bn_batches=bn_batches))


@pytest.mark.skipif(not linear_cpu.ONEDNN, reason="this torch has no oneDNN linear")
def test_wide_mlp_with_per_point_linear_equals_plain_path_and_loop(monkeypatch):
    """Layers of at least MIN_MACS multiply-adds a point, the per-point oneDNN linear taken (forced here); Tanh,
    not ReLU, between them, so that each Linear runs on its own (no LinearBlock)."""
    monkeypatch.setattr(linear_cpu, "_faster_per_point", {})
    monkeypatch.setattr(linear_cpu, "best_seconds", lambda runs, *args: [0.0, 1.0])
    calls = []
    per_point = linear_cpu.per_point_linear
    monkeypatch.setattr(linear_cpu, "per_point_linear", lambda *args: calls.append(1) or per_point(*args))
    def wide() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(19, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
                                   torch.nn.Tanh(), torch.nn.Linear(512, 5))
    models = [seeded(wide, seed) for seed in (1, 2, 3)]
    data = (torch.randn(67, 19), torch.randint(0, 5, (67,)))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(7, 3, seed=7))
    assert calls  # the fast run took it
    calls.clear()
    evaluate(models[0], models, coefficient_rows(7, 3, seed=7), data, metrics=METRICS, fast=False)
    assert not calls


def test_mlp_fast_path_equals_plain_path_and_loop():
    models = [seeded(mlp, seed) for seed in (1, 2, 3)]
    data = (torch.randn(53, 19), torch.randint(0, 5, (53,)))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(37, 3, seed=1))
    assert_fast_equals_plain_and_loop(models, data, coefficient_rows(37, 3, seed=2), memory_budget=30_000)


@pytest.mark.parametrize("bn", ["recompute", "eval"])
def test_cnn_with_batchnorm_fast_path_equals_plain_path_and_loop(bn):
    images = torch.randn(40, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (4, 5)]
    data = [(torch.randn(13, 3, 8, 8), torch.randint(0, 4, (13,))), (torch.randn(9, 3, 8, 8), torch.randint(0, 4, (9,)))]
    bn_batches = [images[:23], images[23:]] if bn == "recompute" else ()
    assert_fast_equals_plain_and_loop(models, data, convex_rows(5, 2, seed=3), bn=bn, bn_batches=bn_batches)


def test_conv1d_layernorm_and_embedding_fast_paths_equal_plain_path_and_loop():
    signals = torch.randn(20, 4, 21)
    conv = [settle_batchnorm(seeded(SequenceConv, seed), signals) for seed in (6, 7)]
    assert_fast_equals_plain_and_loop(conv, (signals[:11], torch.randint(0, 3, (11,))), convex_rows(4, 2, seed=4))
    tokens = [seeded(TokenModel, seed) for seed in (8, 9, 10)]
    assert_fast_equals_plain_and_loop(tokens, (torch.randint(0, 11, (17, 7)), torch.randint(0, 3, (17,))),
                                      coefficient_rows(5, 3, seed=5))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_fallback_fast_path_equals_plain_path_and_loop():
    unknown = [seeded(WithUnknownModules, seed) for seed in (11, 12)]
    assert_fast_equals_plain_and_loop(unknown, (torch.randn(15, 19), torch.randint(0, 5, (15,))),
                                      coefficient_rows(4, 2, seed=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_cross_entropy_and_arg_max_equal_torch_on_odd_shapes(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 37, 7, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 7, (37,), generator=generator)
    logits[0, :5] = 0.5  # five rows of seven equal logits: arg-max takes the first
    logits[1, 5, 2] = logits[1, 5, 4] = logits[1, 5].max() + 1  # a tie between classes 2 and 4
    losses, predicted = small_class_cross_entropy(logits, targets)
    flat = logits.reshape(-1, 7)
    plain = F.cross_entropy(flat, targets.repeat(3), reduction="none").reshape(3, 37)
    exact = F.cross_entropy(flat.double(), targets.repeat(3), reduction="none").reshape(3, 37)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12  # per sample as close as torch's; means relative
    torch.testing.assert_close(losses, plain, rtol=tolerance, atol=tolerance / 10)
    torch.testing.assert_close(losses.double().mean(1), exact.mean(1), rtol=tolerance, atol=0)
    assert torch.equal(predicted, flat.argmax(dim=1).reshape(3, 37))
    assert predicted[1, 5] == 2 and bool((predicted[0, :5] == 0).all())


def test_one_pass_cross_entropy_gives_nan_where_torch_does():
    logits = torch.randn(2, 4, 3)
    logits[0, 1, 2] = float("nan")
    logits[1, 2, 0] = float("inf")
    losses, _ = small_class_cross_entropy(logits, torch.tensor([0, 1, 2, 1]))
    expected = F.cross_entropy(logits.reshape(-1, 3), torch.tensor([0, 1, 2, 1]).repeat(2), reduction="none")
    assert torch.equal(losses.isnan(), expected.reshape(2, 4).isnan()) and int(losses.isnan().sum()) == 2


def test_targets_out_of_range_take_the_plain_path():
    """ignore_index (-100) is F.cross_entropy's business: such batches skip the one-pass path, with equal sums."""
    outputs, targets = torch.randn(2, 6, 5), torch.tensor([0, -100, 4, 2, -100, 1])
    sums = {}
    for fast in (True, False):
        metric_sums = MetricSums(check_metrics(("loss",)), 2, torch.device("cpu"), fast=fast)
        assert not metric_sums._small_classes(outputs, targets)
        metric_sums.add(outputs, targets, 0)
        sums[fast] = metric_sums.result()["loss"]
    torch.testing.assert_close(sums[True], sums[False])
    in_range = MetricSums(check_metrics(("loss",)), 2, torch.device("cpu"))
    assert in_range._small_classes(outputs, targets.clamp_min(0))


def test_chunks_shrink_below_the_minimum_where_activations_outgrow_heap_blocks():
    def wide():
        return torch.nn.Sequential(torch.nn.Linear(8, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 3))

    models = [seeded(wide, seed) for seed in (1, 2)]
    view = SubspaceView(models[0], Basis.from_members(models))
    rows = 1000  # given batches are never split
    data = Batches([(torch.randn(rows, 8), torch.randint(0, 3, (rows,)))])
    coeffs = torch.rand(40, 2)
    view.prepare(coeffs, data.first[0][:2])  # as evaluate does
    chunks = plan_chunks(view, coeffs, [data], None, memory_budget=None, device=torch.device("cpu"))
    per_point = rows * view.activation_bytes_per_sample(coeffs, data.first[0][:1])  # megabytes
    largest = max(c.stop - c.start for c in chunks)
    assert largest == KEEP_MMAP // per_point < CPU_MIN_CHUNK


def test_input_copies_are_reused_within_a_named_batch_only():
    models = [seeded(mlp, seed) for seed in (1, 2)]
    view = SubspaceView(models[0], Basis.from_members(models))
    inputs, coeffs = torch.randn(9, 19), coefficient_rows(6, 2, seed=7)
    with torch.no_grad():
        expected = view(coeffs, inputs)
        outputs = [view(coeffs[:4], inputs, batch=0)]
        held = view._held_inputs[0].copies
        outputs.append(view(coeffs[4:], inputs, offset=4, batch=0))  # fewer points: a prefix of the same copies
        assert view._held_inputs[0].copies is held
        held.zero_()  # copies changed since: written afresh
        outputs.append(view(coeffs[4:], inputs, offset=4, batch=0))
        assert view._held_inputs[0].copies is not held
        other = inputs.clone()
        outputs.append(view(coeffs[:4], other, batch=1))  # another batch: its own copies
        assert view._held_inputs[0].source is other
    for got, rows in zip(outputs, (slice(0, 4), slice(4, 6), slice(4, 6), slice(0, 4))):
        torch.testing.assert_close(got, expected[rows], rtol=1e-6, atol=1e-6)


def test_kept_combined_linear_weights_equal_plain_path_and_loop_and_follow_changed_coefficients(monkeypatch):
    """A narrow Linear on per-point inputs keeps its points' padded combined weights from batch to batch (`kept.py`):
    made once per chunk of points, the numbers those of the plain path and of a per-point loop over several batches
    and chunks, and coefficient rows changed in place or basis tensors changed in place are seen."""
    def narrow() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(13, 21), torch.nn.Tanh(), torch.nn.Linear(21, 5))
    models = [seeded(narrow, seed) for seed in (1, 2, 3)]
    data = [(torch.randn(rows, 13), torch.randint(0, 5, (rows,))) for rows in (17, 9, 17)]
    coeffs = coefficient_rows(7, 3, seed=5)
    assert_fast_equals_plain_and_loop(models, data, coeffs)
    made = []
    combined = ops_torch.combined_linear_weights
    monkeypatch.setattr(ops_torch, "combined_linear_weights", lambda *args: made.append(len(args[2])) or combined(*args))
    evaluate(models[0], models, coeffs, data, metrics=METRICS)
    assert made.count(len(coeffs)) == 1  # one chunk of points, three batches (the first layer's per-basis ones aside)
    basis = Basis.from_members(models)
    views = {fast: SubspaceView(models[0], basis) for fast in (True, False)}
    views[False].state.plain = True
    rows = coeffs.clone()
    with torch.no_grad():
        def agree() -> None:
            for batch, (x, _) in enumerate(data):
                outputs = [view(rows, x, batch=batch) for view in views.values()]
                torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
        agree()
        rows[2] = torch.tensor([0.1, 0.1, 0.8])  # in place: a new version of the same tensor
        agree()
        basis.stacked["2.weight"][1].mul_(0.5)  # in place, seen by both views
        agree()


def test_evaluation_batches_aligned_with_bn_batches_reuse_first_layer_outputs(monkeypatch):
    """BatchNorm recomputed on consecutive row slices of the evaluated inputs: the evaluation takes the same
    batches (`Batches.align_with`), the first block's per-basis outputs are computed once per batch for both passes,
    and the results equal the plain path and a per-point loop. Copies of those rows, or slices that do not cover
    them, leave the batches as they were."""
    images = torch.randn(40, 3, 8, 8)
    models = [settle_batchnorm(seeded(SmallCNN, seed), images) for seed in (4, 5)]
    data = (images, torch.randint(0, 4, (40,)))
    computed = []
    per_basis = conv_block._per_basis_by_patches
    monkeypatch.setattr(conv_block, "_per_basis_by_patches", lambda *args: computed.append(1) or per_basis(*args))
    assert_fast_equals_plain_and_loop(models, data, convex_rows(5, 2, seed=3), bn="recompute",
                                      bn_batches=[images[:23], images[23:]])
    computed.clear()
    bn_data = [(images[:23], data[1][:23]), (images[23:], data[1][23:])]
    evaluate(models[0], models, convex_rows(5, 2, seed=3), data, metrics=METRICS, bn_data=bn_data)
    assert len(computed) == 2  # once per batch of rows, BatchNorm's pass and the evaluation's
    for other, aligned in ((bn_data, True), ([(images[:23].clone(), data[1][:23]), bn_data[1]], False),
                           (bn_data[:1], False), ([bn_data[1], bn_data[0]], False)):
        batches = Batches(data)
        batches.align_with(Batches(other, targets_optional=True))
        assert (batches.bounds == [0, 23, 40]) if aligned else batches.bounds is None
        assert [len(x) for x, _ in batches] == ([23, 17] if aligned else [40])
